//! HTML to structured text: scripts, styles and other non-content elements are dropped, headings
//! become Markdown headings (so the Markdown splitter can follow them), blocks become paragraphs.

use ego_tree::iter::Edge;
use scraper::{Html, Node};

use super::{Extracted, Heading};

/// Elements whose whole subtree carries no readable text.
const SKIPPED: &[&str] = &[
    "head", "script", "style", "noscript", "template", "svg", "math", "iframe", "object", "embed",
    "canvas", "select", "option", "button", "input", "textarea",
];

/// Elements that start and end a block of text.
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "header",
    "footer",
    "nav",
    "aside",
    "ul",
    "ol",
    "li",
    "table",
    "thead",
    "tbody",
    "tfoot",
    "tr",
    "blockquote",
    "pre",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "dl",
    "dt",
    "dd",
    "figure",
    "figcaption",
    "hr",
    "form",
    "fieldset",
    "address",
    "details",
    "summary",
    "body",
    "html",
    "caption",
];

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

/// Accumulates text, collapsing whitespace outside `<pre>`.
struct Writer {
    out: String,
    line: String,
    pending_space: bool,
    headings: Vec<Heading>,
    /// Heading level of the block being written, if it is a heading.
    heading: Option<usize>,
    list_item: bool,
    pre_depth: usize,
}

impl Writer {
    fn text(&mut self, text: &str) {
        if self.pre_depth > 0 {
            self.line.push_str(text);
            return;
        }
        if text.starts_with(char::is_whitespace) {
            self.pending_space = true;
        }
        for (i, word) in text.split_whitespace().enumerate() {
            if (i > 0 || self.pending_space) && !self.line.is_empty() && !self.line.ends_with(' ') {
                self.line.push(' ');
            }
            self.line.push_str(word);
            self.pending_space = false;
        }
        if text.ends_with(char::is_whitespace) {
            self.pending_space = true;
        }
    }

    /// Ends the current block; `separator` follows it.
    fn flush(&mut self, separator: &str) {
        let line = self.line.trim();
        if !line.is_empty() {
            if !self.out.is_empty() && !self.out.ends_with("\n\n") {
                if !self.out.ends_with('\n') {
                    self.out.push('\n');
                }
                if separator == "\n\n" || self.heading.is_some() {
                    self.out.push('\n');
                }
            }
            let offset = self.out.len();
            if let Some(level) = self.heading {
                self.out.push_str(&"#".repeat(level));
                self.out.push(' ');
                self.headings.push(Heading {
                    offset,
                    level,
                    text: line.to_string(),
                });
            } else if self.list_item {
                self.out.push_str("- ");
            }
            self.out.push_str(line);
            self.out.push_str(separator);
        }
        self.line.clear();
        self.pending_space = false;
    }
}

/// Extracts the readable text of an HTML document.
pub(crate) fn extract(html: &str) -> Extracted {
    let document = Html::parse_document(html);
    let mut title: Option<String> = None;
    let mut w = Writer {
        out: String::with_capacity(html.len() / 2),
        line: String::new(),
        pending_space: false,
        headings: Vec::new(),
        heading: None,
        list_item: false,
        pre_depth: 0,
    };
    let mut skip_depth = 0usize;
    let mut in_title = false;
    let mut title_text = String::new();
    for edge in document.tree.root().traverse() {
        match edge {
            Edge::Open(node) => match node.value() {
                Node::Element(el) => {
                    let name = el.name();
                    if name == "title" && title.is_none() {
                        in_title = true;
                    }
                    if skip_depth > 0 || SKIPPED.contains(&name) {
                        skip_depth += 1;
                        continue;
                    }
                    if name == "br" {
                        if w.pre_depth > 0 {
                            w.line.push('\n');
                        } else {
                            w.flush("\n");
                        }
                    } else if BLOCKS.contains(&name) {
                        w.flush("\n\n");
                        if let Some(level) = heading_level(name) {
                            w.heading = Some(level);
                        }
                        if name == "li" || name == "dt" {
                            w.list_item = true;
                        }
                        if name == "pre" {
                            w.pre_depth += 1;
                        }
                    } else if matches!(name, "td" | "th") && !w.line.is_empty() {
                        w.line.push_str(" | ");
                        w.pending_space = false;
                    }
                }
                Node::Text(text) => {
                    if in_title {
                        title_text.push_str(text);
                    } else if skip_depth == 0 {
                        w.text(text);
                    }
                }
                _ => {}
            },
            Edge::Close(node) => {
                if let Node::Element(el) = node.value() {
                    let name = el.name();
                    if name == "title" && in_title {
                        in_title = false;
                        let t = title_text.split_whitespace().collect::<Vec<_>>().join(" ");
                        if !t.is_empty() {
                            title = Some(t);
                        }
                    }
                    if skip_depth > 0 {
                        skip_depth -= 1;
                        continue;
                    }
                    if BLOCKS.contains(&name) {
                        let separator = if matches!(name, "li" | "tr" | "dt" | "dd") {
                            "\n"
                        } else {
                            "\n\n"
                        };
                        w.flush(separator);
                        if heading_level(name).is_some() {
                            w.heading = None;
                        }
                        if name == "li" || name == "dt" {
                            w.list_item = false;
                        }
                        if name == "pre" {
                            w.pre_depth = w.pre_depth.saturating_sub(1);
                        }
                    }
                }
            }
        }
    }
    w.flush("\n");
    let text = w.out.trim_end().to_string();
    let title = title.or_else(|| w.headings.first().map(|h| h.text.clone()));
    Extracted {
        text,
        title,
        headings: w.headings,
        markdown: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_styles_and_tags_are_dropped_and_headings_kept() {
        let html = r#"<!doctype html><html><head><title>Bee  keeping</title>
            <style>body { color: red }</style><script>alert("x")</script></head>
            <body><nav><a href="/">Home</a></nav>
            <h1>Hives</h1><p>Bees <b>make</b> honey.</p>
            <h2>Smoke</h2><p>Smoke calms <i>the</i> colony.<br>Second line.</p>
            <ul><li>one</li><li>two</li></ul>
            <script>var hidden = "secret";</script><noscript>enable js</noscript>
            <table><tr><td>a</td><td>b</td></tr></table>
            </body></html>"#;
        let e = extract(html);
        assert_eq!(e.title.as_deref(), Some("Bee keeping"));
        assert!(e.text.contains("# Hives"), "{}", e.text);
        assert!(e.text.contains("## Smoke"), "{}", e.text);
        assert!(e.text.contains("Bees make honey."), "{}", e.text);
        assert!(e.text.contains("- one\n- two"), "{}", e.text);
        assert!(e.text.contains("a | b"), "{}", e.text);
        for hidden in ["alert", "secret", "color", "enable js", "<"] {
            assert!(!e.text.contains(hidden), "{hidden} leaked into {}", e.text);
        }
        assert_eq!(e.headings.len(), 2);
        let h = &e.headings[1];
        assert_eq!((h.level, h.text.as_str()), (2, "Smoke"));
        assert!(e.text[h.offset..].starts_with("## Smoke"));
    }

    #[test]
    fn title_falls_back_to_the_first_heading_and_pre_keeps_lines() {
        let e = extract("<h2>Only heading</h2><pre>a\n  b</pre>");
        assert_eq!(e.title.as_deref(), Some("Only heading"));
        assert!(e.text.contains("a\n  b"), "{}", e.text);
    }

    #[test]
    fn malformed_html_still_yields_text() {
        let e = extract("<p>unclosed <b>bold <div>inner</p></span>tail");
        assert!(e.text.contains("unclosed bold"), "{}", e.text);
        assert!(e.text.contains("tail"), "{}", e.text);
    }
}
