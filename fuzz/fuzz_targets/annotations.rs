//! Arbitrary annotation values on an otherwise valid state file: the input is cut at its
//! first two 0xFF bytes (never part of UTF-8) into the values of `carousel.dev/weights`,
//! `carousel.dev/load-balancer` and `service.beta.kubernetes.io/load-balancer-source-ranges`
//! (a missing piece leaves its annotation out; bytes that are not UTF-8 become U+FFFD),
//! set on one LoadBalancer Service `default/web` with one TCP port and an EndpointSlice
//! of two endpoints. `file::parse` never panics; the file is refused only over the source
//! ranges (a typo there must not open a guarded Service to everyone), and otherwise
//! yields that Service with both endpoints and at most one warning per annotation; and
//! warnings and refusals are linear in the values, as in `state_file`.
#![no_main]

use carousel::discovery::convert::{
    Scope, Warning, ANNOTATION_LOAD_BALANCER, ANNOTATION_SOURCE_RANGES, ANNOTATION_WEIGHTS,
};
use carousel::discovery::file::{self, StateFileError};
use carousel::model::ServiceKey;
use libfuzzer_sys::fuzz_target;

mod excerpt;
use excerpt::excerpt;

/// As in `state_file`: quoted text is at most 4× longer Debug-escaped, and one value may
/// be quoted in a warning's value and again in its reason.
const AMPLIFICATION: usize = 16;
/// The fixed sentences of three warnings or one refusal, naming `default/web`.
const SLACK: usize = 4096;

const ANNOTATIONS: [&str; 3] = [
    ANNOTATION_WEIGHTS,
    ANNOTATION_LOAD_BALANCER,
    ANNOTATION_SOURCE_RANGES,
];

fuzz_target!(|data: &[u8]| {
    let values: Vec<String> = data
        .splitn(3, |b| *b == 0xFF)
        .map(|piece| String::from_utf8_lossy(piece).into_owned())
        .collect();
    let quoted: usize = values.iter().map(String::len).sum();
    let limit = AMPLIFICATION * quoted + SLACK;
    let text = state_file(&values);

    match file::parse(&text, &Scope::default()) {
        Ok(loaded) => {
            let web = loaded
                .table
                .get(&ServiceKey::new("default", "web"))
                .expect("default/web is in the table");
            assert_eq!(loaded.table.len(), 1);
            assert_eq!(web.ports.len(), 1);
            assert_eq!(web.ports[0].endpoints.len(), 2, "{:?}", web.ports[0]);

            for annotation in ANNOTATIONS {
                let over: Vec<&Warning> = loaded
                    .warnings
                    .iter()
                    .filter(|w| {
                        matches!(w, Warning::BadAnnotation { annotation: a, .. } if *a == annotation)
                    })
                    .collect();
                assert!(
                    over.len() <= 1,
                    "{} warnings over {annotation} (at most one an annotation); the first two: {} | {}",
                    over.len(),
                    excerpt(&over[0].to_string()),
                    excerpt(&over[1].to_string())
                );
            }
            assert!(
                loaded.warnings.len() <= ANNOTATIONS.len(),
                "{} warnings, not all over the annotations: {:?}",
                loaded.warnings.len(),
                loaded
                    .warnings
                    .iter()
                    .map(|w| excerpt(&w.to_string()))
                    .collect::<Vec<_>>()
            );
            let total: usize = loaded.warnings.iter().map(|w| w.to_string().len()).sum();
            assert!(
                total <= limit,
                "{} warnings of {total} bytes in all from values of {quoted} bytes (limit {limit})",
                loaded.warnings.len()
            );
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.len() <= limit,
                "a refusal of {} bytes from values of {quoted} bytes (limit {limit}): {}",
                message.len(),
                excerpt(&message)
            );
            // The file is well formed whatever the values: only the source ranges refuse.
            assert!(
                matches!(&error, StateFileError::Invalid { error, .. }
                    if error.field.contains(ANNOTATION_SOURCE_RANGES)),
                "refused, and not over {ANNOTATION_SOURCE_RANGES}: {}",
                excerpt(&message)
            );
        }
    }
});

/// The state file: the Service with the annotations that have a value, its slice, and
/// the two pods behind it (so that weight rules have labels to match).
fn state_file(values: &[String]) -> String {
    let annotations: Vec<String> = ANNOTATIONS
        .iter()
        .zip(values)
        .map(|(name, value)| format!("{}: {}", quote(name), quote(value)))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  annotations: {{{annotations}}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  ports:
    - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
status:
  loadBalancer:
    ingress: [{{ip: 203.0.113.10}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
  - addresses: [10.244.1.5]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: web-1, namespace: default}}
  - addresses: [10.244.2.7]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: web-2, namespace: default}}
---
apiVersion: v1
kind: List
items:
  - {{apiVersion: v1, kind: Pod, metadata: {{name: web-1, namespace: default, labels: {{version: custom, app: web}}}}}}
  - {{apiVersion: v1, kind: Pod, metadata: {{name: web-2, namespace: default, labels: {{version: original, app: web}}}}}}
"#,
        annotations = annotations.join(", ")
    )
}

/// `text` as a YAML double-quoted scalar. JSON's quoting is YAML's, but JSON leaves raw
/// the characters that YAML allows in no scalar (DEL, the C1 controls, U+FEFF, U+FFFE,
/// U+FFFF) and those that the parser (YAML 1.1) takes for line breaks (U+0085, U+2028,
/// U+2029: `\u{2028}...` would end the document inside the quotes): those are escaped
/// as `\uXXXX` too, so that any text is a valid value.
fn quote(text: &str) -> String {
    let json = serde_json::to_string(text).expect("a string serializes");
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}
