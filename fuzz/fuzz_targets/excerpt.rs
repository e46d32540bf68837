//! Shared by the fuzz targets (each includes it with `mod excerpt;`).

/// The start and end of a long message, so that a failure prints a readable line.
pub fn excerpt(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= 400 {
        return text.to_string();
    }
    let head: String = chars[..300].iter().collect();
    let tail: String = chars[chars.len() - 100..].iter().collect();
    format!("{head} [... {} bytes ...] {tail}", text.len())
}
