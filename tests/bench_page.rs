//! The page of `carousel bench --html` as a browser draws it: headless Chromium
//! (Debian's chromium; .ci/run installs it) lays out a quick run of every scenario, and
//! a script injected into a copy of the page checks that everything each SVG draws lies
//! inside the SVG, that no two texts overlap, and that nothing raised an error. The
//! page itself stays script-free: only the copy under test carries the script.
//!
//! The bench runs in 127.54.0.0/16, which no other test uses.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carousel::lab::bench::{self, BenchOptions};
use indicatif::ProgressBar;
use serde_json::Value;

const NET: u8 = 54;
/// Chromium gets this long to load, lay out and dump a page; then it is killed.
const DEADLINE: Duration = Duration::from_secs(60);

/// Records every error before the page's own content runs: uncaught exceptions,
/// rejected promises, resources that fail to load (captured: they do not bubble), and
/// calls to console.error.
const RECORDER: &str = r#"<script>//<![CDATA[
window.__errors = [];
window.__consoleErrors = 0;
window.addEventListener("error", function (e) {
  var what = e.message || (e.target && e.target.outerHTML) || e.type;
  window.__errors.push(String(what));
}, true);
window.addEventListener("unhandledrejection", function (e) {
  window.__errors.push("unhandled rejection: " + String(e.reason));
});
(function () {
  var original = console.error;
  console.error = function () {
    window.__consoleErrors += 1;
    return original.apply(console, arguments);
  };
})();
//]]></script>
"#;

/// On load: for every <svg>, every drawn element's box against the svg's own (0.5 px
/// of slack), and every pair of its texts against each other (1 px); the summary goes,
/// percent-encoded so that no serializer escapes it, into <pre id="check">.
const CHECKER: &str = r#"<pre id="check">not run</pre>
<script>//<![CDATA[
window.addEventListener("load", function () {
  var slack = 0.5, overlap = 1.0;
  var summary = { svgs: 0, checked: 0, texts: 0, outside: [], overlaps: [], wider: [],
                  viewport: window.innerWidth, errors: window.__errors,
                  consoleErrors: window.__consoleErrors,
                  parserErrors: document.getElementsByTagName("parsererror").length };
  var round = function (v) { return Math.round(v * 10) / 10; };
  var box = function (r) { return [round(r.left), round(r.top), round(r.right), round(r.bottom)]; };
  var svgs = document.getElementsByTagNameNS("http://www.w3.org/2000/svg", "svg");
  for (var i = 0; i < svgs.length; i++) {
    var svg = svgs[i];
    var s = svg.getBoundingClientRect();
    summary.svgs += 1;
    if (s.width > window.innerWidth) {
      summary.wider.push({ svg: i, width: round(s.width) });
    }
    var texts = [];
    var all = svg.querySelectorAll("*");
    for (var j = 0; j < all.length; j++) {
      var el = all[j];
      var name = el.localName;
      if (name === "title" || name === "desc" || name === "defs" || name === "style") {
        continue;
      }
      var r = el.getBoundingClientRect();
      summary.checked += 1;
      if (r.left < s.left - slack || r.top < s.top - slack ||
          r.right > s.right + slack || r.bottom > s.bottom + slack) {
        summary.outside.push({ svg: i, element: name, text: el.textContent,
                               box: box(r), svgBox: box(s) });
      }
      if (name === "text") {
        texts.push({ el: el, r: r });
      }
    }
    summary.texts += texts.length;
    for (var a = 0; a < texts.length; a++) {
      for (var b = a + 1; b < texts.length; b++) {
        var p = texts[a].r, q = texts[b].r;
        var dx = Math.min(p.right, q.right) - Math.max(p.left, q.left);
        var dy = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
        if (dx > overlap && dy > overlap) {
          summary.overlaps.push({ svg: i, texts: [texts[a].el.textContent, texts[b].el.textContent],
                                  boxes: [box(p), box(q)] });
        }
      }
    }
  }
  document.getElementById("check").textContent = encodeURIComponent(JSON.stringify(summary));
});
//]]></script>
"#;

/// `page` with the recorder first in <head> and the checker last in <body>.
fn instrument(page: &str) -> String {
    let head = page.find("<head>").expect("the page has a <head>") + "<head>".len();
    let body = page.rfind("</body>").expect("the page has a </body>");
    format!(
        "{}\n{RECORDER}{}{CHECKER}{}",
        &page[..head],
        &page[head..body],
        &page[body..]
    )
}

/// What Chromium said: the checker's summary, and its stderr.
struct Checked {
    summary: Value,
    stderr: String,
}

/// Loads an instrumented copy of `page` in headless Chromium at `width` px and returns
/// the checker's summary.
fn check_in_chromium(page: &str, width: u32) -> Checked {
    let (dom, stderr) = dump_dom(&instrument(page), width);
    assert!(!dom.contains("<parsererror"), "not well-formed XML:\n{dom}");
    let encoded = dom
        .split("<pre id=\"check\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| panic!("no <pre id=\"check\"> in chromium's DOM:\n{dom}\n{stderr}"));
    let decoded: String = form_urlencoded::parse(format!("s={encoded}").as_bytes())
        .map(|(_, v)| v.into_owned())
        .next()
        .unwrap_or_default();
    let summary: Value = serde_json::from_str(&decoded)
        .unwrap_or_else(|e| panic!("the checker did not run ({e}): {decoded:?}\n{stderr}"));
    Checked { summary, stderr }
}

/// The DOM of `page` once Chromium has loaded it at `width` px, and Chromium's stderr.
/// The page is written as .xhtml, so that Chromium parses it as XML: a page that is not
/// well-formed gets a <parsererror>.
fn dump_dom(page: &str, width: u32) -> (String, String) {
    let dir = tempfile::tempdir().expect("a tempdir");
    let file = dir.path().join("page.xhtml");
    std::fs::write(&file, page).expect("the page copy");
    run_chromium(
        dir.path(),
        &[
            "--dump-dom".to_string(),
            "--virtual-time-budget=5000".to_string(),
            format!("--window-size={width},2000"),
            format!("file://{}", file.display()),
        ],
    );
    let dom = std::fs::read_to_string(dir.path().join("stdout")).expect("chromium's stdout");
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    (dom, stderr)
}

/// Runs chromium headless with a fresh profile in `dir` and `args`, stdout and stderr
/// into files there (a dumped DOM outgrows a pipe nobody reads yet); kills it after
/// `DEADLINE`. Returns how it exited.
fn run_chromium(dir: &Path, args: &[String]) -> std::process::ExitStatus {
    use std::os::unix::process::CommandExt as _;
    let profile = dir.join("profile");
    let stdout = std::fs::File::create(dir.join("stdout")).expect("a stdout file");
    let stderr = std::fs::File::create(dir.join("stderr")).expect("a stderr file");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .expect("chromium (Debian's chromium; .ci/run installs it)");
    let group = child.id();
    let started = Instant::now();
    let status = loop {
        match child.try_wait().expect("waiting for chromium") {
            Some(status) => break Some(status),
            None if started.elapsed() > DEADLINE => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    // The whole group, whether the browser ended or not: its helpers too.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    status.unwrap_or_else(|| panic!("chromium did not finish within {DEADLINE:?}"))
}

/// The summary's list `key`, empty when missing.
fn list<'a>(summary: &'a Value, key: &str) -> &'a [Value] {
    summary[key].as_array().map_or(&[], Vec::as_slice)
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chart_of_a_quick_run_draws_inside_its_svg_in_chromium() {
    let options = BenchOptions {
        scenarios: Vec::new(),
        algorithms: Vec::new(),
        seed: 42,
        quick: true,
        net: NET,
        first_block: 0,
        own: None,
    };
    let report = bench::run(&options, &ProgressBar::hidden())
        .await
        .expect("a quick run of every scenario");
    let page = report.html();
    assert!(!page.contains("<script"), "the page itself is script-free");
    let svgs = page.matches("<svg ").count();
    // A wide window, and a narrow one where every chart must scale down to fit.
    for width in [1280, 420] {
        let Checked { summary, stderr } =
            tokio::task::block_in_place(|| check_in_chromium(&page, width));
        eprintln!(
            "at {width} px: {} svgs, {} elements checked, {} texts",
            count(&summary, "svgs"),
            count(&summary, "checked"),
            count(&summary, "texts")
        );
        assert_eq!(count(&summary, "svgs"), svgs as u64, "{summary}");
        assert!(
            count(&summary, "checked") > 50 * svgs as u64,
            "too few elements checked: {summary}"
        );
        assert_eq!(count(&summary, "parserErrors"), 0, "{summary}");
        assert!(
            list(&summary, "outside").is_empty(),
            "at {width} px: {summary:#}"
        );
        assert!(
            list(&summary, "overlaps").is_empty(),
            "at {width} px: {summary:#}"
        );
        assert!(
            list(&summary, "wider").is_empty(),
            "at {width} px: {summary:#}"
        );
        assert!(list(&summary, "errors").is_empty(), "{summary}");
        assert_eq!(count(&summary, "consoleErrors"), 0, "{summary}");
        assert!(!stderr.contains("Uncaught"), "{stderr}");
    }
}

/// The harness itself fails where it should: a text running off its SVG, two texts on
/// each other, and a script error.
#[test]
fn the_browser_check_reports_what_overflows() {
    let page = "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<title>t</title>\n</head>\n<body>\n\
<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 200 50\" width=\"100%\" style=\"max-width:200px\">\n\
<text x=\"150\" y=\"20\" font-size=\"12\">a text much too long for its svg</text>\n\
<text x=\"4\" y=\"40\" font-size=\"12\">one</text>\n<text x=\"6\" y=\"41\" font-size=\"12\">two</text>\n\
<rect x=\"0\" y=\"0\" width=\"10\" height=\"10\" fill=\"#000\"/>\n</svg>\n\
<p>after</p>\n</body>\n</html>\n";
    let broken = page.replace("<p>after</p>", "<script>no_such_function();</script>");
    let Checked { summary, stderr } = check_in_chromium(&broken, 800);
    assert_eq!(count(&summary, "checked"), 4, "{summary}");
    let outside = list(&summary, "outside");
    assert_eq!(outside.len(), 1, "{summary}");
    assert_eq!(outside[0]["text"], "a text much too long for its svg");
    let overlaps = list(&summary, "overlaps");
    assert_eq!(overlaps.len(), 1, "{summary}");
    assert_eq!(overlaps[0]["texts"], serde_json::json!(["one", "two"]));
    let errors = list(&summary, "errors");
    assert!(
        errors.len() == 1
            && errors[0]
                .as_str()
                .unwrap_or("")
                .contains("no_such_function"),
        "{summary}"
    );
    assert!(stderr.contains("Uncaught"), "{stderr}");
    // A page that is not well-formed XML shows a parser error.
    let malformed = page.replace("<p>after</p>", "<p>after<br></p>");
    let (dom, _) = dump_dom(&instrument(&malformed), 800);
    assert!(dom.contains("<parsererror"), "{dom}");
}
