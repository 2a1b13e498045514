//! The state diagram stays true: the states drawn in `docs/states.dot` are
//! exactly the variants of `conn::State` in `src/conn.rs`, and the rendered
//! `docs/states.svg` the guide shows was drawn from the `.dot` as it is now
//! (same nodes, same edges).
//!
//! The `.dot` file's node names are `State` variants (CamelCase) plus the
//! two ends of a connection's life, `accepted` and `closed`, which are not
//! states. After editing the `.dot`, render it again with
//! `dot -Tsvg docs/states.dot -o docs/states.svg`.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// The diagram's nodes that are not `State` variants.
const ENDS: [&str; 2] = ["accepted", "closed"];

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The variant names of `pub enum State { .. }` in Rust source: the
/// identifiers that open an item at brace depth one, doc comments skipped.
fn state_variants(source: &str) -> BTreeSet<String> {
    let start = source
        .find("pub enum State {")
        .expect("src/conn.rs has no `pub enum State {`");
    let body = &source[start + "pub enum State {".len()..];
    let mut depth = 1;
    let mut variants = BTreeSet::new();
    for line in body.lines() {
        let code = line.trim();
        if depth == 1 && !code.starts_with("//") && !code.starts_with('#') {
            let name: String = code
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                variants.insert(name);
            }
        }
        if !code.starts_with("//") {
            depth += code.matches('{').count();
            depth -= code.matches('}').count();
        }
        if depth == 0 {
            return variants;
        }
    }
    panic!("`pub enum State` in src/conn.rs never closes");
}

/// The `.dot` file's statements, with comments, attribute lists and the
/// `graph`/`node`/`edge` defaults dropped: `(from, Some(to))` for an edge,
/// `(name, None)` for a node statement.
fn dot_statements(dot: &str) -> Vec<(String, Option<String>)> {
    let body = &dot[dot.find('{').expect("no `{` in the .dot") + 1..];
    // Keep what is outside comments and `[...]`, quote-aware.
    let mut kept = String::new();
    let (mut quoted, mut bracket, mut comment) = (false, false, false);
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' if comment => comment = false,
            _ if comment => {}
            '"' => quoted = !quoted,
            '\\' if quoted => {
                chars.next();
            }
            _ if quoted => {}
            '/' if chars.peek() == Some(&'/') => comment = true,
            '[' => bracket = true,
            ']' => bracket = false,
            _ if bracket => {}
            '}' => break,
            _ => kept.push(c),
        }
        if quoted && !bracket && c != '"' {
            kept.push(c);
        }
    }
    let mut statements = Vec::new();
    for statement in kept.split([';', '\n']) {
        let head = statement.trim();
        if head.is_empty() || ["graph", "node", "edge"].contains(&head) {
            continue;
        }
        let mut ends = head.split("->").map(|s| s.trim().to_string());
        let from = ends.next().unwrap();
        let to = ends.next();
        assert!(
            ends.next().is_none(),
            "write one edge per statement: {head}"
        );
        statements.push((from, to));
    }
    statements
}

fn dot_nodes(statements: &[(String, Option<String>)]) -> BTreeSet<String> {
    statements
        .iter()
        .flat_map(|(from, to)| std::iter::once(from.clone()).chain(to.clone()))
        .collect()
}

fn dot_edges(statements: &[(String, Option<String>)]) -> BTreeSet<(String, String)> {
    statements
        .iter()
        .filter_map(|(from, to)| Some((from.clone(), to.clone()?)))
        .collect()
}

/// The `<title>` of every `class="node"` (or `"edge"`) group Graphviz wrote.
fn svg_titles(svg: &str, class: &str) -> Vec<String> {
    let marker = format!("class=\"{class}\">");
    svg.split(&marker)
        .skip(1)
        .map(|rest| {
            let start = rest.find("<title>").expect("a group without a title") + "<title>".len();
            let end = rest[start..].find("</title>").unwrap() + start;
            rest[start..end]
                .replace("&#45;", "-")
                .replace("&gt;", ">")
                .replace("&lt;", "<")
                .replace("&amp;", "&")
        })
        .collect()
}

#[test]
fn every_state_is_drawn_and_every_drawn_state_exists() {
    let code = state_variants(&read("src/conn.rs"));
    assert!(
        code.contains("Open") && code.len() >= 2,
        "the State parser found {code:?}"
    );
    let drawn: BTreeSet<String> = dot_nodes(&dot_statements(&read("docs/states.dot")))
        .into_iter()
        .filter(|n| !ENDS.contains(&n.as_str()))
        .collect();
    let missing: Vec<_> = code.difference(&drawn).collect();
    let unknown: Vec<_> = drawn.difference(&code).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/states.dot is out of date: states not drawn {missing:?}, \
         drawn but not in conn::State {unknown:?}"
    );
}

#[test]
fn every_state_can_be_entered_and_left() {
    let statements = dot_statements(&read("docs/states.dot"));
    let edges = dot_edges(&statements);
    for node in dot_nodes(&statements) {
        let entered = edges.iter().any(|(_, to)| *to == node);
        let left = edges.iter().any(|(from, _)| *from == node);
        match node.as_str() {
            "accepted" => assert!(left && !entered, "`accepted` only starts edges"),
            "closed" => assert!(entered && !left, "`closed` only ends edges"),
            state => assert!(entered && left, "{state} is drawn as a dead end"),
        }
    }
}

#[test]
fn the_checked_in_svg_is_rendered_from_the_dot_as_it_is() {
    let statements = dot_statements(&read("docs/states.dot"));
    let svg = read("docs/states.svg");
    let nodes: BTreeSet<String> = svg_titles(&svg, "node").into_iter().collect();
    let edges: BTreeSet<(String, String)> = svg_titles(&svg, "edge")
        .into_iter()
        .map(|t| {
            let (from, to) = t.split_once("->").expect("an edge title is `from->to`");
            (from.to_string(), to.to_string())
        })
        .collect();
    let stale = "docs/states.svg is stale: run `dot -Tsvg docs/states.dot -o docs/states.svg`";
    assert_eq!(nodes, dot_nodes(&statements), "{stale}");
    assert_eq!(edges, dot_edges(&statements), "{stale}");
}

#[test]
fn the_parsers_see_what_is_there() {
    // The checks above are only as good as these parsers: make them fail
    // on inputs that differ in one state.
    let src = "/// doc\n#[derive(Debug)]\npub enum State {\n    /// A.\n    A { x: u8 },\n    \
               /// B.\n    B,\n    C(u8),\n}\nenum Other { D }\n";
    let want: BTreeSet<String> = ["A", "B", "C"].map(String::from).into();
    assert_eq!(state_variants(src), want);
    let dot = "// A -> Z\ndigraph g { node [shape=box]; A -> B [label=\"x -> y; z\"]; C; }";
    let st = dot_statements(dot);
    assert_eq!(dot_nodes(&st), want);
    assert_eq!(dot_edges(&st), [("A".to_string(), "B".to_string())].into());
}
