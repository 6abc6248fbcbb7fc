//! Where a key is in the YAML text, for errors that serde_yaml did not locate itself.

/// serde_yaml says "path: message at line L column C"; make sure a line is always named.
pub(super) fn describe_yaml_error(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    if message.contains(" at line ") {
        return message;
    }
    // Errors about the document's overall shape carry no location: that is line 1.
    let line = e.location().map_or(1, |l| l.line());
    if message.contains(": ") {
        format!("{message} at line {line}")
    } else {
        format!("(document): {message} at line {line}")
    }
}

/// One step of a path into the YAML document.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

pub(super) fn display_path(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A non-blank, non-comment line of YAML: its number, the indent of its content after
/// any `- ` markers, that content, and the columns of its `- ` markers.
struct YamlLine<'a> {
    number: usize,
    indent: usize,
    content: &'a str,
    dashes: Vec<usize>,
}

impl YamlLine<'_> {
    /// The column where the line starts: its first `- ` marker, or its content.
    fn start(&self) -> usize {
        self.dashes.first().copied().unwrap_or(self.indent)
    }

    fn key(&self) -> Option<&str> {
        let (key, _) = self.content.split_once(':')?;
        Some(key.trim().trim_matches(['"', '\'']))
    }
}

fn yaml_lines(text: &str) -> Vec<YamlLine<'_>> {
    text.lines()
        .enumerate()
        .filter_map(|(n, line)| {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                return None;
            }
            let mut indent = line.len() - trimmed.len();
            let mut content = trimmed;
            let mut dashes = Vec::new();
            while content == "-" || content.starts_with("- ") {
                dashes.push(indent);
                let rest = content[1..].trim_start();
                indent += content.len() - rest.len();
                content = rest;
            }
            Some(YamlLine {
                number: n + 1,
                indent,
                content,
                dashes,
            })
        })
        .collect()
}

/// The 1-based line of `path` in block-style YAML, or of its deepest ancestor found
/// (flow-style collections are not walked into).
pub(crate) fn locate(text: &str, path: &[Seg<'_>]) -> usize {
    let lines = yaml_lines(text);
    let mut found = 1;
    // The lines of the current node's children, and the column their keys or items start at.
    let (mut from, mut to) = (0, lines.len());
    let mut child_col = lines.first().map_or(0, YamlLine::start);
    for seg in path {
        let hit = match seg {
            Seg::Key(k) => {
                (from..to).find(|&i| lines[i].indent == child_col && lines[i].key() == Some(k))
            }
            Seg::Index(n) => (from..to)
                .filter(|&i| lines[i].dashes.first() == Some(&child_col))
                .nth(*n),
        };
        let Some(i) = hit else { break };
        found = lines[i].number;
        match seg {
            Seg::Key(_) => {
                // Children: the following lines that start right of this key.
                from = i + 1;
                to = (from..to)
                    .find(|&j| lines[j].start() <= child_col)
                    .unwrap_or(to);
                child_col = lines
                    .get(from)
                    .filter(|_| from < to)
                    .map_or(usize::MAX, YamlLine::start);
            }
            Seg::Index(_) => {
                // The item's keys: on its own line after "- ", and below it at that column.
                let item_col = child_col;
                from = i;
                to = (i + 1..to)
                    .find(|&j| lines[j].start() <= item_col)
                    .unwrap_or(to);
                child_col = lines[i].indent;
            }
        }
    }
    found
}
