//! The bench's HTML page: one self-contained XHTML file (no script, no outside
//! resource) with inline SVG charts that a newcomer can read, each with axes, units and
//! a legend, and each scaling down with the window (a `viewBox`, drawn within it).
//!
//! Layout is computed here, not by the browser, so text widths are estimated
//! ([`text_width`]) on the wide side, and every label is cut to the room it has.

use std::fmt::Write as _;

use crate::lab::bench::findings::Finding;
use crate::lab::bench::report::{cut, label, Report, RunResult};
use crate::lab::bench::scenarios;

/// Every chart's width in SVG units: the page shows it at this size, or narrower.
const W: f64 = 820.0;
/// Room on the left for a row's name (an algorithm, "+affinity": about 30 characters).
const LEFT: f64 = 240.0;
/// Where the share chart's bars end: 100 %.
const SHARE_END: f64 = 800.0;
/// Where bars with their value written after them end, leaving room for the value.
const BAR_END: f64 = 740.0;
/// Font sizes: chart titles, row names, axes and legends, values at bar ends.
const TITLE: f64 = 13.0;
const ROW: f64 = 12.0;
const SMALL: f64 = 11.0;
const VALUE: f64 = 9.0;
/// A legend row's height, and the legend swatch's side.
const LEGEND_ROW: f64 = 16.0;
const SWATCH: f64 = 10.0;
/// The widest a pod's name may be in a legend, in SVG units (about 24 characters).
const LEGEND_NAME: f64 = 170.0;

/// Tableau 10: distinct for up to ten pods, the usual case.
const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// p50, p99, p999: greys from light to dark, so that they cannot be read as pods.
const PERCENTILES: [(&str, &str); 3] = [
    ("#c8c8c8", "p50: half the requests took no longer"),
    ("#7a7a7a", "p99: 99 % took no longer"),
    ("#262626", "p999: 99.9 % took no longer"),
];

impl Report {
    /// One self-contained page (XHTML, so any XML parser can check it): per scenario a
    /// chart of share against target, one of latency percentiles, and for scenarios
    /// whose pods change, the clients moved, the time to converge and the share over
    /// time per algorithm; then the numbers as a table.
    pub fn html(&self) -> String {
        let mut out = String::from(HEAD);
        let _ = writeln!(
            out,
            "<h1>carousel bench</h1>\n<p>carousel {}, {} CPUs, seed {}{}; every number measured through carousel's data path.</p>",
            escape(&self.carousel_version),
            self.cpus,
            self.seed,
            if self.quick { ", quick run" } else { "" }
        );
        if let Some(note) = self.pods_note() {
            let _ = writeln!(out, "<p class=\"pods\">{}</p>", escape(&note));
        }
        out.push_str(GLOSSARY);
        for scenario in self.scenarios() {
            let results = self.results_of(scenario);
            let _ = writeln!(
                out,
                "<section id=\"scenario-{0}\">\n<h2>{0}{1}</h2>",
                escape(scenario),
                escape(self.transport_note(scenario))
            );
            if let Some(about) = scenarios::about(scenario) {
                let _ = writeln!(out, "<p class=\"shows\">Shows: {}.</p>", escape(about));
            }
            let found: Vec<&Finding> = self
                .findings
                .iter()
                .filter(|f| f.scenario == scenario)
                .collect();
            if !found.is_empty() {
                out.push_str("<ul class=\"findings\">\n");
                for f in found {
                    let _ = writeln!(out, "<li>{}</li>", escape(&f.text));
                }
                out.push_str("</ul>\n");
            }
            let palette = Palette::of(&results);
            out.push_str(&share_chart(scenario, &results, &palette));
            out.push_str(&latency_chart(&results));
            if results.iter().any(|r| r.moved_fraction.is_some()) {
                out.push_str(&moved_chart(&results));
                out.push_str(&converged_chart(&results));
                out.push_str(TIME_NOTE);
                for r in &results {
                    out.push_str(&time_chart(r, &palette));
                }
            }
            out.push_str(&html_table(&results));
            out.push_str("</section>\n");
        }
        out.push_str("</body>\n</html>\n");
        out
    }
}

const HEAD: &str = "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n<title>carousel bench</title>\n<style>\nbody{font-family:sans-serif;margin:2em;color:#222}\nsvg.chart{display:block;height:auto;margin:0.5em 0 1.5em 0}\ntable{border-collapse:collapse;font-size:0.85em}\ntd,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}\np.note{font-size:0.9em;color:#444;max-width:52em}\n</style>\n</head>\n<body>\n";

/// What the page's columns and words mean.
const GLOSSARY: &str = "<details class=\"glossary\">\n<summary>Glossary</summary>\n<dl>\n\
<dt>share, target</dt><dd>A pod's part of the answered requests, and the part its weights ask for (the weights of the table each connection met, averaged over the run).</dd>\n\
<dt>Jain</dt><dd>Jain's fairness index of each pod's share over its target: 1 when every pod gets exactly its target, 1/n when one of n pods gets everything.</dd>\n\
<dt>max/mean</dt><dd>The busiest pod's share over target against the mean of the same: 1 when balanced, 2 when one pod carries twice its part.</dd>\n\
<dt>dev</dt><dd>The largest distance between a pod's share and its target, in points of share (0.05: five percentage points).</dd>\n\
<dt>p50, p99, p999</dt><dd>Request latency as the client saw it, in milliseconds: half, 99 %, 99.9 % of requests took no longer.</dd>\n\
<dt>stickiness</dt><dd>For clients with more than one connection, the part of a client's connections that reached its most frequent pod: 1 when every client stays on one pod.</dd>\n\
<dt>moved</dt><dd>At each change of the pods, the part of the clients seen before and after whose pod changed.</dd>\n\
<dt>converged</dt><dd>After the first change of the pods, the time until every pod stays within 5 points of its target share.</dd>\n\
</dl>\n</details>\n";

/// How to read the share-over-time charts, whose change line is inferred (see
/// [`first_change`]).
const TIME_NOTE: &str = "<p class=\"note\">Share over time: a column per tenth of the run, each pod's share of the connections that started in it. The dashed line is the start of the first tenth in which the pods that answer differ from the first tenth's; the solid line is converged_ms after it, from where on every pod stays within 5 points of its target (both at a tenth's resolution).</p>\n";

/// Text for XML: the page is XHTML, so any `&`, `<`, `>` or `"` in a name would break it.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An upper estimate of `text`'s width at font `size` in a wide sans-serif (DejaVu
/// Sans, the widest of the usual defaults): the layout must not rely on the browser.
fn text_width(text: &str, size: f64) -> f64 {
    let em: f64 = text
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '\'' | '!' | '|' => 0.3,
            'f' | 't' | 'r' | ' ' | '-' | '(' | ')' | '[' | ']' | '/' => 0.42,
            'm' | 'w' | 'M' | 'W' | '%' | '@' => 1.0,
            '+' | '=' | '<' | '>' | '~' | '_' => 0.84,
            c if c.is_ascii_uppercase() => 0.8,
            c if c.is_ascii() => 0.64,
            _ => 1.0,
        })
        .sum();
    em * size
}

/// `text` cut in the middle (pod names differ at their ends) until its estimated width
/// at `size` is at most `room`.
fn fit(text: &str, size: f64, room: f64) -> String {
    let mut chars = text.chars().count();
    loop {
        let kept = cut(text, chars.max(1));
        if chars <= 1 || text_width(&kept, size) <= room {
            return kept;
        }
        chars -= 1;
    }
}

/// Ticks from 0 to at least `max` at a round step (1, 2 or 5 times a power of ten),
/// at most six of them; an empty or broken range gets 0 to 1.
fn ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let step = step_for(max);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// The round step that cuts 0..`max` into at most five parts.
fn step_for(max: f64) -> f64 {
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// A tick's label, with as many decimals as its step needs and no more.
fn tick_label(value: f64, ticks: &[f64]) -> String {
    let step = match ticks {
        [_, second, ..] => *second,
        _ => 1.0,
    };
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()).max(0.0) as usize
    };
    format!("{value:.decimals$}")
}

/// A linear map of 0..`max` onto `from`..`to` in SVG units.
#[derive(Clone, Copy)]
struct Scale {
    max: f64,
    from: f64,
    to: f64,
}

impl Scale {
    /// The scale of 0..`max` (0..1 when `max` is not above 0).
    fn new(max: f64, from: f64, to: f64) -> Self {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        Self { max, from, to }
    }

    /// The scale of `ticks`: from 0 to its last tick.
    fn of(ticks: &[f64], from: f64, to: f64) -> Self {
        Self::new(ticks.last().copied().unwrap_or(1.0), from, to)
    }

    /// Where `value` goes, kept within the scale's range.
    fn at(&self, value: f64) -> f64 {
        let v = if value.is_finite() { value } else { 0.0 };
        self.from + (v / self.max).clamp(0.0, 1.0) * (self.to - self.from)
    }
}

/// Each pod's colour, by name, the same in every chart of a scenario: the palette's for
/// up to ten pods, beyond that hues spread around the wheel at three lightnesses so that
/// no two pods share a colour.
struct Palette {
    pods: Vec<String>,
    colors: Vec<String>,
}

impl Palette {
    fn of(results: &[&RunResult]) -> Self {
        let mut pods: Vec<String> = Vec::new();
        for p in results.iter().flat_map(|r| &r.pods) {
            if !pods.contains(&p.pod) {
                pods.push(p.pod.clone());
            }
        }
        let colors = colors(pods.len());
        Self { pods, colors }
    }

    fn color(&self, pod: &str) -> &str {
        self.pods
            .iter()
            .position(|p| p == pod)
            .and_then(|i| self.colors.get(i))
            .map_or("#000", String::as_str)
    }

    /// The legend's entries: every pod with its colour.
    fn entries(&self) -> Vec<(String, String)> {
        self.pods
            .iter()
            .cloned()
            .zip(self.colors.iter().cloned())
            .collect()
    }
}

/// `n` distinct colours.
fn colors(n: usize) -> Vec<String> {
    if n <= PALETTE.len() {
        return PALETTE[..n].iter().map(|c| c.to_string()).collect();
    }
    (0..n)
        .map(|i| {
            let hue = (i as f64 * 137.508) % 360.0;
            let lightness = [38, 52, 66][i % 3];
            format!("hsl({hue:.0},60%,{lightness}%)")
        })
        .collect()
}

/// A legend entry where it goes: its swatch's corner, and its name as cut to fit.
#[derive(Debug)]
struct Placed {
    x: f64,
    row: usize,
    name: String,
}

impl Placed {
    /// From the swatch's left to the name's estimated end.
    #[cfg(test)]
    fn width(&self) -> f64 {
        SWATCH + 4.0 + text_width(&self.name, SMALL)
    }
}

/// Legend entries in a grid of equal columns between `left` and `right`, as many
/// columns as the widest name allows and as many rows as the entries need, so that
/// fifty pods stay legible instead of running off the chart's edge.
fn legend_layout(names: &[&str], left: f64, right: f64, room: f64) -> Vec<Placed> {
    let gap = 14.0;
    let room = (right - left - SWATCH - 4.0).min(room);
    let fitted: Vec<String> = names.iter().map(|n| fit(n, SMALL, room)).collect();
    let widest = fitted
        .iter()
        .map(|n| text_width(n, SMALL))
        .fold(0.0, f64::max);
    let column = SWATCH + 4.0 + widest + gap;
    let columns = (((right - left + gap) / column).floor() as usize).max(1);
    fitted
        .into_iter()
        .enumerate()
        .map(|(i, name)| Placed {
            x: left + column * (i % columns) as f64,
            row: i / columns,
            name,
        })
        .collect()
}

/// Draws a legend of (name, colour) from `y` down, each name at most `room` wide;
/// returns where it ends.
fn legend(svg: &mut Svg, entries: &[(String, String)], y: f64, room: f64) -> f64 {
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    let placed = legend_layout(&names, 4.0, W - 4.0, room);
    for (p, (name, color)) in placed.iter().zip(entries) {
        let top = y + LEGEND_ROW * p.row as f64;
        svg.rect(p.x, top, SWATCH, SWATCH, color, Some(name));
        svg.text(p.x + SWATCH + 4.0, top + 9.5, SMALL, Anchor::Start, &p.name);
    }
    let rows = placed.last().map_or(0, |p| p.row + 1);
    y + LEGEND_ROW * rows as f64
}

/// Draws an x axis at `y` with its ticks, their labels and the axis's own label (its
/// unit) centred under it; returns where it ends.
fn x_axis(svg: &mut Svg, scale: &Scale, ticks: &[f64], y: f64, unit: &str, label: &str) -> f64 {
    svg.line(scale.from, y, scale.to, y, "#555", false);
    for t in ticks {
        let x = scale.at(*t);
        svg.line(x, y, x, y + 4.0, "#555", false);
        let text = format!("{}{unit}", tick_label(*t, ticks));
        svg.text(x, y + 16.0, SMALL, Anchor::Middle, &text);
    }
    let middle = (scale.from + scale.to) / 2.0;
    let room = 2.0 * middle.min(W - middle) - 8.0;
    svg.text(
        middle,
        y + 32.0,
        SMALL,
        Anchor::Middle,
        &fit(label, SMALL, room),
    );
    y + 36.0
}

/// A row's name at the left, cut to the left margin.
fn row_label(svg: &mut Svg, y: f64, name: &str) {
    svg.text(4.0, y, ROW, Anchor::Start, &fit(name, ROW, LEFT - 12.0));
}

#[derive(Clone, Copy)]
enum Anchor {
    Start,
    Middle,
    End,
}

/// An SVG being drawn: its elements in order, its size given when it is finished.
struct Svg {
    body: String,
}

impl Svg {
    fn new() -> Self {
        Self {
            body: String::new(),
        }
    }

    fn text(&mut self, x: f64, y: f64, size: f64, anchor: Anchor, text: &str) {
        let anchor = match anchor {
            Anchor::Start => "",
            Anchor::Middle => " text-anchor=\"middle\"",
            Anchor::End => " text-anchor=\"end\"",
        };
        let _ = writeln!(
            self.body,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\"{anchor}>{}</text>",
            escape(text)
        );
    }

    /// A filled rectangle, with a tooltip when `title` is given.
    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: Option<&str>) {
        let _ = write!(
            self.body,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"",
            w.max(0.0),
            h.max(0.0)
        );
        match title {
            Some(t) => {
                let _ = writeln!(self.body, "><title>{}</title></rect>", escape(t));
            }
            None => self.body.push_str("/>\n"),
        }
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, dashed: bool) {
        let dash = if dashed {
            " stroke-dasharray=\"4 3\""
        } else {
            ""
        };
        let _ = writeln!(
            self.body,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{stroke}\"{dash}/>"
        );
    }

    /// The whole element, at least `height` high: a `viewBox` and a width of 100 % up
    /// to its own, so that it scales down with the window and keeps its proportions.
    fn finish(self, attributes: &str, height: f64) -> String {
        let height = height.ceil();
        format!(
            "<svg {attributes} xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {height:.0}\" width=\"100%\" style=\"max-width:{W}px\">\n{}</svg>\n",
            self.body
        )
    }
}

/// Stacked bars, one row per algorithm under a row for the target: each pod's share
/// of requests as a segment in its colour, on an axis of 0 to 100 %.
fn share_chart(scenario: &str, results: &[&RunResult], palette: &Palette) -> String {
    let mut svg = Svg::new();
    svg.text(
        4.0,
        16.0,
        TITLE,
        Anchor::Start,
        "Share of the requests per pod, against the target",
    );
    svg.text(
        4.0,
        32.0,
        SMALL,
        Anchor::Start,
        "each bar is one run's requests, a segment per pod in the legend's colours",
    );
    let scale = Scale::new(1.0, LEFT, SHARE_END);
    let top = 42.0;
    let mut rows: Vec<(String, Vec<(&str, f64)>)> = Vec::new();
    if let Some(first) = results.first() {
        let target = first
            .pods
            .iter()
            .map(|p| (p.pod.as_str(), p.target_share))
            .collect();
        rows.push(("target".into(), target));
    }
    for r in results {
        let shares = r
            .pods
            .iter()
            .map(|p| (p.pod.as_str(), p.request_share))
            .collect();
        rows.push((label(r), shares));
    }
    for (i, (name, shares)) in rows.iter().enumerate() {
        let y = top + 22.0 * i as f64;
        row_label(&mut svg, y + 12.5, name);
        let mut from = 0.0;
        for (pod, share) in shares {
            let (x0, x1) = (scale.at(from), scale.at(from + share));
            if x1 > x0 {
                let tip = format!("{pod}: {:.1} %", 100.0 * share);
                svg.rect(x0, y, x1 - x0, 16.0, palette.color(pod), Some(&tip));
            }
            from += share;
        }
    }
    let axis = top + 22.0 * rows.len() as f64 + 2.0;
    let percent = [0.0, 20.0, 40.0, 60.0, 80.0, 100.0];
    let scale100 = Scale::of(&percent, LEFT, SHARE_END);
    let end = x_axis(
        &mut svg,
        &scale100,
        &percent,
        axis,
        " %",
        "share of the run's requests (%)",
    );
    let end = legend(&mut svg, &palette.entries(), end + 8.0, LEGEND_NAME);
    svg.finish(
        &format!(
            "class=\"chart scenario-chart\" data-scenario=\"{}\"",
            escape(scenario)
        ),
        end + 4.0,
    )
}

/// p50, p99 and p999 per algorithm as grouped bars on one linear scale in ms, from 0,
/// in three greys the legend names.
fn latency_chart(results: &[&RunResult]) -> String {
    let mut svg = Svg::new();
    svg.text(4.0, 16.0, TITLE, Anchor::Start, "Latency per request (ms)");
    let entries: Vec<(String, String)> = PERCENTILES
        .iter()
        .map(|(color, name)| (name.to_string(), color.to_string()))
        .collect();
    let top = legend(&mut svg, &entries, 26.0, W) + 8.0;
    let max = results
        .iter()
        .map(|r| r.latency_ms.p999)
        .fold(0.0, f64::max);
    let ticks = ticks(max);
    let scale = Scale::of(&ticks, LEFT, BAR_END);
    let group = 41.0;
    for (i, r) in results.iter().enumerate() {
        let y = top + group * i as f64;
        row_label(&mut svg, y + 20.0, &label(r));
        let values = [r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.p999];
        for (j, (v, (color, _))) in values.iter().zip(PERCENTILES).enumerate() {
            let yy = y + 11.0 * j as f64;
            let x = scale.at(*v).max(LEFT + 1.0);
            svg.rect(LEFT, yy, x - LEFT, 8.0, color, None);
            svg.text(x + 4.0, yy + 8.0, VALUE, Anchor::Start, &format!("{v:.2}"));
        }
    }
    let axis = top + group * results.len() as f64;
    let end = x_axis(
        &mut svg,
        &scale,
        &ticks,
        axis,
        "",
        "latency per request (ms), on a linear scale from 0",
    );
    svg.finish("class=\"chart latency-chart\"", end + 4.0)
}

/// One horizontal bar per row on `scale`, its value written after it, or `none` where
/// the row has no value; under them an x axis.
struct Bars<'a> {
    attributes: &'a str,
    title: &'a str,
    rows: Vec<(String, Option<f64>)>,
    ticks: Vec<f64>,
    /// The decimals of the values written after the bars.
    decimals: usize,
    unit: &'a str,
    axis: &'a str,
    none: &'a str,
}

impl Bars<'_> {
    fn draw(&self) -> String {
        let mut svg = Svg::new();
        svg.text(4.0, 16.0, TITLE, Anchor::Start, self.title);
        let scale = Scale::of(&self.ticks, LEFT, BAR_END);
        let top = 28.0;
        for (i, (name, value)) in self.rows.iter().enumerate() {
            let y = top + 20.0 * i as f64;
            row_label(&mut svg, y + 11.5, name);
            match value {
                Some(v) => {
                    let x = scale.at(*v).max(LEFT + 1.0);
                    svg.rect(LEFT, y, x - LEFT, 14.0, "#5f7f9f", None);
                    let text = format!("{v:.0$}{1}", self.decimals, self.unit);
                    svg.text(x + 4.0, y + 11.0, SMALL, Anchor::Start, &text);
                }
                None => svg.text(LEFT + 4.0, y + 11.0, SMALL, Anchor::Start, self.none),
            }
        }
        let axis = top + 20.0 * self.rows.len() as f64;
        let end = x_axis(&mut svg, &scale, &self.ticks, axis, self.unit, self.axis);
        svg.finish(self.attributes, end + 4.0)
    }
}

/// `moved_fraction` per algorithm, in % of the clients.
fn moved_chart(results: &[&RunResult]) -> String {
    Bars {
        attributes: "class=\"chart moved-chart\"",
        title: "Clients moved by the changes of the pods",
        rows: results
            .iter()
            .map(|r| (label(r), r.moved_fraction.map(|m| 100.0 * m)))
            .collect(),
        ticks: vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0],
        decimals: 1,
        unit: " %",
        axis: "clients whose pod changed (% of those seen before and after a change)",
        none: "not measured",
    }
    .draw()
}

/// `converged_ms` per algorithm; "never" where the shares never settled.
fn converged_chart(results: &[&RunResult]) -> String {
    let max = results
        .iter()
        .filter_map(|r| r.converged_ms)
        .fold(0.0, f64::max);
    Bars {
        attributes: "class=\"chart converged-chart\"",
        title: "Time to converge after the first change of the pods",
        rows: results.iter().map(|r| (label(r), r.converged_ms)).collect(),
        ticks: ticks(max),
        decimals: 0,
        unit: " ms",
        axis: "ms until every pod stays within 5 points of its target",
        none: "never: the shares did not settle within 5 points",
    }
    .draw()
}

/// Where the pods first change in `windows`, as the start of the first window whose
/// answering pods (share above 0) differ from those of the first window with any
/// connection. The report does not keep the change's own time; this is its window.
fn first_change(windows: &[crate::lab::bench::report::Window]) -> Option<f64> {
    let answering = |shares: &[f64]| -> Vec<bool> { shares.iter().map(|s| *s > 0.0).collect() };
    let mut busy = windows
        .iter()
        .filter(|w| w.connection_share.iter().sum::<f64>() > 0.0);
    let first = answering(&busy.next()?.connection_share);
    busy.find(|w| answering(&w.connection_share) != first)
        .map(|w| w.start_ms)
}

/// One run's share of connections over time: a column per window, stacked by pod, on
/// axes of time (ms) and share (%); lines at the first change and at convergence.
fn time_chart(r: &RunResult, palette: &Palette) -> String {
    let (left, right, top, height) = (56.0, W - 20.0, 60.0, 150.0);
    let bottom = top + height;
    let mut svg = Svg::new();
    let title = format!("{}: share of the connections over time", label(r));
    svg.text(
        4.0,
        16.0,
        TITLE,
        Anchor::Start,
        &fit(&title, TITLE, W - 8.0),
    );
    svg.text(4.0, top - 8.0, SMALL, Anchor::Start, "%");
    for share in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let y = bottom - share / 100.0 * height;
        svg.line(left, y, right, y, "#e4e4e4", false);
        svg.text(
            left - 6.0,
            y + 4.0,
            SMALL,
            Anchor::End,
            &format!("{share:.0}"),
        );
    }
    // The run's own length, not the next round number: the columns fill the plot.
    let end_ms = r.windows.iter().map(|w| w.end_ms).fold(0.0, f64::max);
    let ticks: Vec<f64> = ticks(end_ms)
        .into_iter()
        .filter(|t| *t <= end_ms * (1.0 + 1e-9))
        .collect();
    let scale = Scale::new(end_ms, left, right);
    for w in &r.windows {
        let (x0, x1) = (scale.at(w.start_ms) + 0.5, scale.at(w.end_ms) - 0.5);
        let mut y = bottom;
        for (p, share) in w.connection_share.iter().enumerate() {
            let h = share.clamp(0.0, 1.0) * height;
            if h <= 0.0 {
                continue;
            }
            y -= h;
            let pod = r.pods.get(p).map_or("?", |p| p.pod.as_str());
            let tip = format!(
                "{pod}, {:.0} to {:.0} ms: {:.1} %",
                w.start_ms,
                w.end_ms,
                100.0 * share
            );
            svg.rect(x0, y, x1 - x0, h, palette.color(pod), Some(&tip));
        }
    }
    let change = first_change(&r.windows);
    if let Some(at) = change {
        marker(&mut svg, scale.at(at), 32.0, bottom, "pods change", true);
    }
    match (change, r.converged_ms) {
        (Some(at), Some(after)) => {
            let text = format!("converged after {after:.0} ms");
            marker(&mut svg, scale.at(at + after), 46.0, bottom, &text, false);
        }
        (None, Some(after)) => {
            let text = format!("converged {after:.0} ms after the first change");
            svg.text(right, 46.0, SMALL, Anchor::End, &text);
        }
        (_, None) => svg.text(right, 46.0, SMALL, Anchor::End, "did not converge"),
    }
    let end = x_axis(
        &mut svg,
        &scale,
        &ticks,
        bottom,
        "",
        "time since the run started (ms)",
    );
    let end = legend(&mut svg, &palette.entries(), end + 8.0, LEGEND_NAME);
    svg.finish("class=\"chart time-chart\"", end + 4.0)
}

/// A vertical line at `x` from just under `label_y` down to `bottom`, its label on the
/// line's right, or on its left where the right has no room.
fn marker(svg: &mut Svg, x: f64, label_y: f64, bottom: f64, label: &str, dashed: bool) {
    svg.line(x, label_y + 4.0, x, bottom, "#222", dashed);
    if x + 4.0 + text_width(label, SMALL) <= W - 4.0 {
        svg.text(x + 4.0, label_y, SMALL, Anchor::Start, label);
    } else {
        svg.text(x - 4.0, label_y, SMALL, Anchor::End, label);
    }
}

/// The numbers of a scenario, a row per algorithm.
fn html_table(results: &[&RunResult]) -> String {
    let mut t = String::from("<table>\n<tr><th>algorithm</th><th>connections</th><th>failed</th><th>Jain</th><th>max/mean</th><th>p50 ms</th><th>p99 ms</th><th>p999 ms</th><th>stickiness</th><th>moved</th><th>converged ms</th></tr>\n");
    for r in results {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        // Converged is "never" only where something changed and the shares never settled.
        let converged = match (r.moved_fraction, r.converged_ms) {
            (_, Some(ms)) => format!("{ms:.0}"),
            (Some(_), None) => "never".to_string(),
            (None, None) => "-".to_string(),
        };
        let _ = writeln!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{converged}</td></tr>",
            escape(&label(r)),
            r.connections,
            r.failed_connections,
            r.jain_fairness,
            r.max_mean_ratio,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.p999,
            opt(r.stickiness),
            opt(r.moved_fraction)
        );
    }
    t.push_str("</table>\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::bench::report::{Latency, PodResult, Window};

    fn result(algorithm: &str, pods: &[String]) -> RunResult {
        let n = pods.len() as f64;
        let json = serde_json::json!({
            "scenario": "many",
            "algorithm": algorithm,
            "connections": 1000,
            "failed_connections": 0,
            "pods": [],
            "jain_fairness": 1.0,
            "max_mean_ratio": 1.0,
            "latency_ms": {"p50": 1.0, "p99": 2.0, "p999": 3.0},
            "stickiness": null,
            "moved_fraction": 0.25,
            "affinity": true,
            "requests": 1000,
            "max_target_deviation": 0.0,
            "converged_ms": null,
            "windows": [],
        });
        let mut r: RunResult = serde_json::from_value(json).expect("a result");
        r.pods = pods
            .iter()
            .map(|p| {
                let json = serde_json::json!({
                    "pod": p,
                    "target_share": 1.0 / n,
                    "connection_share": 1.0 / n,
                    "request_share": 1.0 / n,
                    "connections": 10,
                    "requests": 10,
                });
                serde_json::from_value::<PodResult>(json).expect("a pod")
            })
            .collect();
        r.latency_ms = Latency {
            p50: 1234.5,
            p99: 12345.6,
            p999: 123456.7,
        };
        r
    }

    fn long_names(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| format!("kubechaos-custom-5f6c8d9-{i:02}"))
            .collect()
    }

    #[test]
    fn ticks_are_round_start_at_zero_and_reach_the_maximum() {
        assert_eq!(ticks(100.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(ticks(123456.7), vec![0.0, 50000.0, 100000.0, 150000.0]);
        assert_eq!(ticks(0.0), ticks(1.0));
        assert_eq!(ticks(f64::NAN), ticks(1.0));
        for max in [0.003, 0.87, 1.0, 7.3, 42.0, 99.99, 250.0, 1e6 + 1.0] {
            let t = ticks(max);
            assert_eq!(t[0], 0.0);
            assert!(*t.last().unwrap() >= max, "{max}: {t:?}");
            assert!((2..=6).contains(&t.len()), "{max}: {t:?}");
            let step = t[1];
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (m - mantissa).abs() < 1e-6),
                "{max}: {t:?}"
            );
        }
        let t = ticks(0.87);
        let labels: Vec<String> = t.iter().map(|v| tick_label(*v, &t)).collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
    }

    #[test]
    fn fifty_long_pod_names_fit_the_legend_in_rows() {
        let names = long_names(50);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let placed = legend_layout(&names, 4.0, W - 4.0, LEGEND_NAME);
        assert_eq!(placed.len(), 50);
        for p in &placed {
            assert!(p.x >= 4.0 && p.x + p.width() <= W - 4.0, "{p:?}");
            assert!(p.width() <= SWATCH + 4.0 + LEGEND_NAME, "{p:?}");
        }
        // Entries of a row never overlap, and rows are as full as the width allows.
        for pair in placed.windows(2) {
            if pair[0].row == pair[1].row {
                assert!(pair[0].x + pair[0].width() < pair[1].x, "{pair:?}");
            }
        }
        let rows = placed.last().unwrap().row + 1;
        assert!(rows > 1 && rows < 50, "{rows} rows");
        // Names too long are cut in the middle, keeping both ends.
        for (p, name) in placed.iter().zip(&names) {
            assert!(p.name.contains('…'), "{p:?}");
            assert!(p.name.starts_with("kube") && p.name.ends_with(&name[name.len() - 2..]));
        }
        let short = legend_layout(&["pod-01", "pod-02"], 4.0, W - 4.0, LEGEND_NAME);
        assert_eq!(short[1].name, "pod-02");
        assert_eq!(short[1].row, 0);
    }

    #[test]
    fn a_cut_name_fits_its_room() {
        assert_eq!(fit("round-robin", ROW, LEFT - 12.0), "round-robin");
        let long = "weighted-round-robin +affinity and more besides";
        let kept = fit(long, ROW, LEFT - 12.0);
        assert!(kept.contains('…') && text_width(&kept, ROW) <= LEFT - 12.0);
        assert!(kept.starts_with("weighted") && kept.ends_with("besides"));
        // The longest names of the bench fit whole.
        for name in [
            "weighted-round-robin +affinity",
            "power-of-two-choices +affinity",
        ] {
            assert_eq!(fit(name, ROW, LEFT - 12.0), name);
        }
        assert_eq!(fit("wide", 100.0, 1.0), "…");
    }

    #[test]
    fn fifty_pods_get_fifty_colours() {
        let c = colors(50);
        let mut unique = c.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 50);
        assert_eq!(colors(4), PALETTE[..4]);
        assert!(PERCENTILES
            .iter()
            .all(|(p, _)| !PALETTE.contains(p) && !c.contains(&p.to_string())));
    }

    /// An SVG of a page: its viewBox's size, and every coordinate it draws at (a rect's
    /// far corner too), by the attribute's name: "x" for x, x1, x2 and x + width.
    struct Drawn {
        width: f64,
        height: f64,
        points: Vec<(char, f64)>,
    }

    /// The value of attribute `name` in `element`, if it has it.
    fn attribute(element: &str, name: &str) -> Option<f64> {
        let value = element.split(&format!(" {name}=\"")).nth(1)?;
        value.split('"').next()?.parse().ok()
    }

    fn drawn(page: &str) -> Vec<Drawn> {
        let mut out = Vec::new();
        for svg in page.split("<svg ").skip(1) {
            let view = svg.split("viewBox=\"0 0 ").nth(1).unwrap();
            let mut size = view.split(['"', ' ']).map(|v| v.parse::<f64>().unwrap());
            let (width, height) = (size.next().unwrap(), size.next().unwrap());
            let body = svg.split("</svg>").next().unwrap();
            let mut points = Vec::new();
            for element in body.split('<').skip(1) {
                let element = element.split('>').next().unwrap();
                for (axis, names) in [('x', ["x", "x1", "x2"]), ('y', ["y", "y1", "y2"])] {
                    points.extend(
                        names
                            .iter()
                            .filter_map(|n| attribute(element, n))
                            .map(|v| (axis, v)),
                    );
                }
                if element.starts_with("rect ") {
                    let corner = |at: &str, size: &str| {
                        Some(attribute(element, at)? + attribute(element, size)?)
                    };
                    points.extend(corner("x", "width").map(|v| ('x', v)));
                    points.extend(corner("y", "height").map(|v| ('y', v)));
                }
            }
            out.push(Drawn {
                width,
                height,
                points,
            });
        }
        out
    }

    #[test]
    fn every_chart_has_a_viewbox_and_draws_inside_it() {
        let pods = long_names(50);
        let mut a = result("weighted-round-robin", &pods);
        a.windows = (0..10)
            .map(|i| Window {
                start_ms: 20.0 * i as f64,
                end_ms: 20.0 * (i + 1) as f64,
                connection_share: (0..50)
                    .map(|p| if i < 3 && p >= 25 { 0.0 } else { 1.0 })
                    .map(|v| v / if i < 3 { 25.0 } else { 50.0 })
                    .collect(),
            })
            .collect();
        a.converged_ms = Some(80.0);
        let mut b = result("power-of-two-choices", &pods[..10]);
        b.affinity = false;
        let report = Report {
            version: 1,
            seed: 1,
            quick: true,
            results: vec![a, b],
            carousel_version: "0".into(),
            cpus: 2,
            findings: Vec::new(),
            own_pods: None,
        };
        let page = report.html();
        let svgs = drawn(&page);
        // Share, latency, moved, converged, and one time chart per result.
        assert_eq!(svgs.len(), 6);
        for svg in &svgs {
            assert_eq!(svg.width, W);
            assert!(svg.points.len() > 40);
            for (axis, v) in &svg.points {
                let limit = if *axis == 'x' { svg.width } else { svg.height };
                assert!(
                    (0.0..=limit).contains(v),
                    "{axis}={v} outside {}x{}",
                    svg.width,
                    svg.height
                );
            }
        }
        assert_eq!(
            page.matches("width=\"100%\" style=\"max-width:820px\"")
                .count(),
            6
        );
        // The change shows at the fourth window (60 ms), convergence 80 ms after it.
        assert!(page.contains(">pods change</text>"), "{page}");
        assert!(page.contains(">converged after 80 ms</text>"));
        assert!(page.contains(">did not converge</text>"));
        assert!(page.contains(">never: the shares did not settle within 5 points</text>"));
        assert!(page.contains("<td>never</td>"));
        assert!(page.contains("<td>80</td>"));
    }

    #[test]
    fn the_first_change_is_the_first_window_with_other_pods() {
        let window = |i: usize, shares: &[f64]| Window {
            start_ms: 10.0 * i as f64,
            end_ms: 10.0 * (i + 1) as f64,
            connection_share: shares.to_vec(),
        };
        let windows = [
            window(0, &[0.0, 0.0, 0.0]),
            window(1, &[0.5, 0.5, 0.0]),
            window(2, &[0.4, 0.6, 0.0]),
            window(3, &[0.3, 0.3, 0.4]),
        ];
        assert_eq!(first_change(&windows), Some(30.0));
        assert_eq!(first_change(&windows[..3]), None);
        assert_eq!(first_change(&[]), None);
    }
}
