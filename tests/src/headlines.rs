//! The headline results the benchmark sections report, gathered for the summary table
//! that opens docs/benchmarks.md: each beside its goal and whether it is met.

use std::sync::Mutex;

/// One line of the summary.
pub struct Headline {
    pub section: &'static str,
    pub measure: String,
    pub result: String,
    /// The goal, or "-" where there is none.
    pub goal: String,
    /// None where there is no goal.
    pub met: Option<bool>,
}

static HEADLINES: Mutex<Vec<Headline>> = Mutex::new(Vec::new());

/// Records a result for the summary.
pub fn record(
    section: &'static str,
    measure: impl Into<String>,
    result: impl Into<String>,
    goal: impl Into<String>,
    met: Option<bool>,
) {
    HEADLINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Headline {
            section,
            measure: measure.into(),
            result: result.into(),
            goal: goal.into(),
            met,
        });
}

/// Every result recorded so far, in order.
pub fn take() -> Vec<Headline> {
    std::mem::take(&mut *HEADLINES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A range of ratios as `a-bx` (or `ax` when they agree to two places).
pub fn ratio_range(values: &[f64]) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if format!("{lo:.2}") == format!("{hi:.2}") {
        format!("{lo:.2}x")
    } else {
        format!("{lo:.2}-{hi:.2}x")
    }
}

/// The summary table, as Markdown.
pub fn table(headlines: &[Headline]) -> String {
    let mut out = String::from("| section | measure | result | goal | |\n|---|---|---|---|---|\n");
    for h in headlines {
        let verdict = match h.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        out += &format!(
            "| {} | {} | {} | {} | {verdict} |\n",
            h.section, h.measure, h.result, h.goal
        );
    }
    out
}

/// Breaks every prose paragraph of `markdown` longer than `max` characters into
/// paragraphs of whole sentences (or, for a sentence longer than that, of clauses ending
/// in "; "), and a long list into one paragraph per item: a reader finds a result in
/// short paragraphs. Tables, headings, images and code are left as they are.
pub fn reflow(markdown: &str, max: usize) -> String {
    let mut out = Vec::new();
    for para in markdown.split("\n\n") {
        let starts = |p: &str| para.trim_start().starts_with(p);
        if para.len() <= max || starts("|") || starts("#") || starts("!") || starts("```") {
            out.push(para.to_owned());
        } else if starts("- ") {
            out.extend(para.split("\n- ").enumerate().map(|(i, item)| {
                if i == 0 {
                    item.to_owned()
                } else {
                    format!("- {item}")
                }
            }));
        } else {
            out.extend(pack(&split_keeping(para, &[". "]), max, &["; "]));
        }
    }
    out.join("\n\n")
}

/// `text` cut after each occurrence of a separator that ends a sentence (the next
/// character is upper case, a digit or punctuation that opens a sentence here).
fn split_keeping(text: &str, separators: &[&str]) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let hit = separators.iter().find(|s| text[i..].starts_with(**s));
        if let Some(sep) = hit {
            let next = i + sep.len();
            let opens = bytes.get(next).is_some_and(|c| {
                c.is_ascii_uppercase() || c.is_ascii_digit() || b"`(\"".contains(c)
            });
            if opens || sep.starts_with(';') {
                pieces.push(text[start..next].to_owned());
                start = next;
            }
            i = next;
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    pieces.push(text[start..].to_owned());
    pieces.retain(|p| !p.trim().is_empty());
    pieces
}

/// Packs pieces into paragraphs of at most `max` characters; a piece longer than that is
/// cut at `finer` separators first.
fn pack(pieces: &[String], max: usize, finer: &[&str]) -> Vec<String> {
    let mut paragraphs = Vec::new();
    let mut current = String::new();
    for piece in pieces {
        let parts = if piece.len() > max && !finer.is_empty() {
            split_keeping(piece, finer)
        } else {
            vec![piece.clone()]
        };
        for part in parts {
            if !current.is_empty() && current.len() + part.len() > max {
                paragraphs.push(current.trim().to_owned());
                current.clear();
            }
            current += &part;
        }
    }
    if !current.trim().is_empty() {
        paragraphs.push(current.trim().to_owned());
    }
    paragraphs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paragraphs_are_cut_between_sentences_and_nothing_is_lost() {
        let sentence = "A sentence of some length that says one thing about a figure. ";
        let text = format!(
            "{}\n\n| a | b |\n|---|---|\n\n- one\n- two",
            sentence.repeat(30)
        );
        let out = reflow(&text, 300);
        for para in out.split("\n\n") {
            assert!(para.len() <= 300 || para.starts_with('|'), "{para}");
        }
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(words(&out), words(&text));
        assert!(out.contains("| a | b |\n|---|---|"), "tables stay whole");
        // A short list stays one block; a long one becomes one paragraph per item.
        assert!(out.contains("- one\n- two"));
        let long_list = format!("- {}\n- {}", "x ".repeat(200), "y ".repeat(200));
        assert_eq!(reflow(&long_list, 300).split("\n\n").count(), 2);
    }

    #[test]
    fn a_sentence_longer_than_the_limit_is_cut_at_its_clauses() {
        let text = format!("{}end.", "clause with words; ".repeat(40));
        for para in reflow(&text, 200).split("\n\n") {
            assert!(para.len() <= 200, "{para}");
        }
    }
}
