//! Parsing reputation feeds: plain lists, Spamhaus DROP (text and JSON lines), FireHOL
//! netsets. A bad line is counted and kept as an example, never fatal for the rest.

use std::collections::HashSet;

use ipnet::IpNet;

use crate::{config::FeedFormat, prefix::parse_prefix};

/// At most this many rejected lines are kept as examples.
pub const MAX_EXAMPLES: usize = 5;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedFeed {
    /// Distinct prefixes, host bits cleared.
    pub entries: HashSet<IpNet>,
    /// Lines whose prefix had host bits set (`10.0.0.1/8`), normalised.
    pub host_bits_cleared: usize,
    /// Lines that were neither a prefix, a comment nor blank.
    pub rejected: usize,
    /// A few rejected lines, as `line N: text`.
    pub examples: Vec<String>,
    /// Spamhaus JSON's metadata line: how many records the file says it has.
    pub declared_records: Option<usize>,
    /// Records seen (prefix lines, good or bad), to compare with `declared_records`.
    pub records: usize,
}

impl ParsedFeed {
    fn reject(&mut self, line_no: usize, text: &str) {
        self.rejected += 1;
        if self.examples.len() < MAX_EXAMPLES {
            let shown: String = text.chars().take(80).collect();
            self.examples.push(format!("line {line_no}: {shown}"));
        }
    }

    fn accept(&mut self, line_no: usize, token: &str) {
        self.records += 1;
        match parse_prefix(token) {
            Ok(p) => {
                if p.had_host_bits {
                    self.host_bits_cleared += 1;
                }
                self.entries.insert(p.net);
            }
            Err(_) => self.reject(line_no, token),
        }
    }
}

/// Parses a whole feed body (bytes that need not be UTF-8).
pub fn parse(body: &[u8], format: FeedFormat) -> ParsedFeed {
    let format = match format {
        FeedFormat::Auto => detect(body),
        f => f,
    };
    let mut out = ParsedFeed::default();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = String::from_utf8_lossy(raw);
        let line = line.trim_end_matches('\r').trim();
        if format == FeedFormat::SpamhausDropJson {
            parse_json_line(&mut out, line_no, line);
            continue;
        }
        // `#` and `;` start comments, also after an entry ("1.2.3.0/24 ; SBL123").
        let data = line.split(['#', ';']).next().unwrap_or_default().trim();
        if data.is_empty() {
            continue;
        }
        // One prefix per line; anything after it on the line makes the line suspect.
        let mut tokens = data.split_whitespace();
        let first = tokens.next().unwrap_or_default();
        if tokens.next().is_some() {
            out.records += 1;
            out.reject(line_no, data);
        } else {
            out.accept(line_no, first);
        }
    }
    out
}

/// JSON lines (Spamhaus DROP .json): an object per line with `cidr`, and a trailing
/// metadata object (`"type":"metadata"`) that says how many records there are.
fn parse_json_line(out: &mut ParsedFeed, line_no: usize, line: &str) {
    if line.is_empty() {
        return;
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
        out.records += 1;
        out.reject(line_no, line);
        return;
    };
    if value["type"] == "metadata" {
        out.declared_records = value["records"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok());
        return;
    }
    match value["cidr"].as_str() {
        Some(cidr) => out.accept(line_no, cidr),
        None => {
            out.records += 1;
            out.reject(line_no, line);
        }
    }
}

/// JSON lines if the first meaningful line is an object; else one prefix per line (which
/// covers plain lists, Spamhaus DROP text and FireHOL netsets alike).
fn detect(body: &[u8]) -> FeedFormat {
    let first = body
        .split(|&b| b == b'\n')
        .map(|l| String::from_utf8_lossy(l).trim().to_owned())
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'));
    match first {
        Some(l) if l.starts_with('{') => FeedFormat::SpamhausDropJson,
        _ => FeedFormat::Plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(p: &ParsedFeed) -> Vec<String> {
        let mut v: Vec<String> = p.entries.iter().map(ToString::to_string).collect();
        v.sort();
        v
    }

    #[test]
    fn plain_lists_with_comments_blank_lines_and_crlf() {
        let body = b"# a header\r\n\r\n192.0.2.0/24\r\n198.51.100.7 # trailing comment\r\n; semicolon comment\n2001:db8::/32 ; also trailing\n  203.0.113.0/24  \n";
        let p = parse(body, FeedFormat::Plain);
        assert_eq!(
            nets(&p),
            [
                "192.0.2.0/24",
                "198.51.100.7/32",
                "2001:db8::/32",
                "203.0.113.0/24"
            ]
        );
        assert_eq!((p.rejected, p.host_bits_cleared), (0, 0));
    }

    #[test]
    fn spamhaus_drop_text() {
        let body = b"; Spamhaus DROP List 2026/11/23 - (c) 2026 The Spamhaus Project SLU\n; Last-Modified: Sun, 22 Nov 2026 12:00:00 GMT\n1.10.16.0/20 ; SBL256894\n1.19.0.0/16 ; SBL434604\n";
        let p = parse(body, FeedFormat::SpamhausDrop);
        assert_eq!(nets(&p), ["1.10.16.0/20", "1.19.0.0/16"]);
        assert_eq!(parse(body, FeedFormat::Auto), p);
    }

    #[test]
    fn spamhaus_drop_json_with_its_metadata_line() {
        let body = br#"{"cidr":"1.10.16.0/20","sblid":"SBL256894","rir":"apnic"}
{"cidr":"2001:db8:bad::/48","sblid":"SBL1","rir":"ripencc"}
{"type":"metadata","timestamp":1795400000,"size":12345,"records":2,"copyright":"(c) 2026 The Spamhaus Project SLU","terms":"https://www.spamhaus.org/drop/terms/"}
"#;
        let p = parse(body, FeedFormat::SpamhausDropJson);
        assert_eq!(nets(&p), ["1.10.16.0/20", "2001:db8:bad::/48"]);
        assert_eq!((p.declared_records, p.records, p.rejected), (Some(2), 2, 0));
        assert_eq!(parse(body, FeedFormat::Auto), p, "detected");
        let bad = parse(
            b"{\"sblid\":\"x\"}\n{broken\n{\"cidr\":\"1.2.3.0/33\"}\n",
            FeedFormat::SpamhausDropJson,
        );
        assert_eq!(bad.rejected, 3);
    }

    #[test]
    fn firehol_netset() {
        let body = b"#\n# firehol_level1\n#\n# ipv4 hash:net ipset\n#\n0.0.0.0/8\n192.0.2.66\n10.0.0.0/8\n";
        let p = parse(body, FeedFormat::FireholNetset);
        assert_eq!(nets(&p), ["0.0.0.0/8", "10.0.0.0/8", "192.0.2.66/32"]);
    }

    #[test]
    fn host_bits_are_cleared_and_counted_duplicates_merge() {
        let p = parse(b"10.0.0.1/8\n10.0.0.0/8\n192.0.2.9/24\n", FeedFormat::Plain);
        assert_eq!(nets(&p), ["10.0.0.0/8", "192.0.2.0/24"]);
        assert_eq!(p.host_bits_cleared, 2);
    }

    #[test]
    fn garbage_is_counted_with_examples_and_never_fatal() {
        let mut body = Vec::new();
        for i in 0..10 {
            body.extend_from_slice(format!("garbage line {i}\n192.0.2.{i}\n").as_bytes());
        }
        body.extend_from_slice(b"1.2.3.4/33\n\xff\xfe binary\n300.1.1.1\n");
        let p = parse(&body, FeedFormat::Plain);
        assert_eq!(p.entries.len(), 10, "the good lines all count");
        assert_eq!(p.rejected, 13);
        assert_eq!(p.examples.len(), MAX_EXAMPLES);
        assert_eq!(p.examples[0], "line 1: garbage line 0");
    }
}
