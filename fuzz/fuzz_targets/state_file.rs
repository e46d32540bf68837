//! `file::parse` on arbitrary bytes (those that are UTF-8, as the watcher only parses
//! text): it never panics, and what it returns is linear in the input. On success the
//! table holds at most one Service per `BYTES_PER_SERVICE` bytes, and all the warnings
//! together, as logged, are at most `AMPLIFICATION` times the input plus `SLACK`; on
//! refusal, so is the error's message. A file that makes carousel hold, log or retain
//! more than that (YAML aliases expanded without limit, a long value quoted once per
//! entry or per port) fails here.
#![no_main]

use carousel::discovery::convert::Scope;
use carousel::discovery::file;
use libfuzzer_sys::fuzz_target;

mod excerpt;
use excerpt::excerpt;

/// The fewest bytes a Service can take. It needs `apiVersion`, `kind`, `metadata.name`
/// and `spec`, and its name (or namespace) must differ from every other's: flow style with
/// one-letter YAML aliases for every key and fixed value,
/// `{*A : *v,*K : *k,*M : {*N : b},*S : *s},`, is 41 bytes; 20 leaves room for cleverer
/// tricks than that one and still refuses anything superlinear.
const BYTES_PER_SERVICE: usize = 20;
/// Text quoted from the file comes out Debug-escaped: YAML's two-byte escapes `\L` and
/// `\P` (U+2028, U+2029) become the eight characters `\u{2028}` (4×), and an alias may
/// put one value in a message three times (as the object's name, a map key in the field
/// path and the value at fault). A warning repeats its Service's key, which Kubernetes
/// keeps to 63 + 1 + 63 characters, for each port or annotation entry of 20-odd bytes
/// (about 8×). 16 covers both.
const AMPLIFICATION: usize = 16;
/// A few messages' fixed sentences, for inputs of a few bytes.
const SLACK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limit = AMPLIFICATION * text.len() + SLACK;
    match file::parse(text, &Scope::default()) {
        Ok(loaded) => {
            let services = loaded.table.len();
            assert!(
                services <= text.len() / BYTES_PER_SERVICE,
                "{services} Services from {} bytes (at most one per {BYTES_PER_SERVICE} bytes)",
                text.len()
            );
            let lines: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
            let total: usize = lines.iter().map(String::len).sum();
            assert!(
                total <= limit,
                "{} warnings of {total} bytes in all from {} bytes of input (limit {limit}); \
                 the longest: {}",
                lines.len(),
                text.len(),
                excerpt(
                    lines
                        .iter()
                        .max_by_key(|l| l.len())
                        .map_or("", String::as_str)
                ),
            );
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.len() <= limit,
                "a refusal of {} bytes from {} bytes of input (limit {limit}): {}",
                message.len(),
                text.len(),
                excerpt(&message)
            );
        }
    }
});
