//! kubectl's JSONPath templates (`{.items[*].metadata.name}`, `{range .items[*]}{.x}{"\n"}{end}`),
//! evaluated with serde_json_path (RFC 9535) for each `{...}` expression.

use anyhow::{Result, anyhow, bail};
use serde_json::Value;
use serde_json_path::JsonPath;

#[derive(Debug)]
enum Node {
    Text(String),
    Path(JsonPath),
    Range(JsonPath, Vec<Node>),
}

/// Renders `template` against `value`, as `kubectl get -o jsonpath=...` does: several results of
/// one expression are separated by spaces; strings print without quotes.
pub fn render(template: &str, value: &Value) -> Result<String> {
    let tokens = tokenize(template)?;
    let mut pos = 0;
    let nodes = parse(&tokens, &mut pos, false)?;
    let mut out = String::new();
    eval(&nodes, value, &mut out);
    Ok(out)
}

#[derive(Debug)]
enum Token {
    Text(String),
    Expr(String),
}

fn tokenize(template: &str) -> Result<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        match rest.find('{') {
            None => {
                tokens.push(Token::Text(rest.to_owned()));
                break;
            }
            Some(start) => {
                if start > 0 {
                    tokens.push(Token::Text(rest[..start].to_owned()));
                }
                let end = matching_brace(&rest[start..])
                    .ok_or_else(|| anyhow!("unclosed {{ in JSONPath template {template:?}"))?;
                tokens.push(Token::Expr(rest[start + 1..start + end].trim().to_owned()));
                rest = &rest[start + end + 1..];
            }
        }
    }
    Ok(tokens)
}

/// The offset of the `}` closing the `{` at offset 0, skipping quoted strings.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn parse(tokens: &[Token], pos: &mut usize, in_range: bool) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    while *pos < tokens.len() {
        let token = &tokens[*pos];
        *pos += 1;
        match token {
            Token::Text(t) => nodes.push(Node::Text(t.clone())),
            Token::Expr(e) if e == "end" => {
                if in_range {
                    return Ok(nodes);
                }
                bail!("{{end}} without {{range}} in JSONPath template");
            }
            Token::Expr(e) if e.starts_with("range ") => {
                let path = compile(e["range ".len()..].trim())?;
                let body = parse(tokens, pos, true)?;
                nodes.push(Node::Range(path, body));
            }
            Token::Expr(e) if e.starts_with('"') || e.starts_with('\'') => {
                nodes.push(Node::Text(unquote(e)?));
            }
            Token::Expr(e) => nodes.push(Node::Path(compile(e)?)),
        }
    }
    if in_range {
        bail!("{{range}} without {{end}} in JSONPath template");
    }
    Ok(nodes)
}

fn unquote(literal: &str) -> Result<String> {
    let inner = &literal[1..literal.len().saturating_sub(1).max(1)];
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some(other) => out.push(other),
                None => bail!("dangling escape in {literal}"),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// kubectl writes paths relative to the current object (`.items[*]`); RFC 9535 wants `$`.
fn compile(expr: &str) -> Result<JsonPath> {
    let rooted = if expr.starts_with('$') {
        expr.to_owned()
    } else if expr.starts_with('.') || expr.starts_with('[') {
        format!("${expr}")
    } else if expr == "@" {
        "$".to_owned()
    } else {
        format!("$.{expr}")
    };
    JsonPath::parse(&rooted).map_err(|e| anyhow!("invalid JSONPath expression {{{expr}}}: {e}"))
}

fn eval(nodes: &[Node], value: &Value, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Path(p) => {
                let results: Vec<String> = p.query(value).all().into_iter().map(show).collect();
                out.push_str(&results.join(" "));
            }
            Node::Range(p, body) => {
                for item in p.query(value).all() {
                    eval(body, item, out);
                }
            }
        }
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kubectl_templates() {
        let list = json!({"items": [
            {"metadata": {"name": "node-1"}, "status": {"addresses": [
                {"type": "InternalIP", "address": "10.224.0.4"},
                {"type": "Hostname", "address": "node-1"}]}},
            {"metadata": {"name": "node-2"}, "status": {"addresses": [
                {"type": "Hostname", "address": "node-2"}]}}]});
        assert_eq!(
            render(
                "{.items[*].status.addresses[?(@.type==\"Hostname\")].address}",
                &list
            )
            .unwrap(),
            "node-1 node-2"
        );
        assert_eq!(
            render("{range .items[*]}{.metadata.name}{\"\\n\"}{end}", &list).unwrap(),
            "node-1\nnode-2\n"
        );
        let svc = json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}});
        assert_eq!(
            render("{.status.loadBalancer.ingress[0].ip}", &svc).unwrap(),
            "198.51.100.1"
        );
        assert_eq!(
            render("ip={.status.loadBalancer.ingress[0].ip}!", &svc).unwrap(),
            "ip=198.51.100.1!"
        );
        assert!(render("{.items[", &list).is_err());
        assert!(render("{range .items[*]}", &list).is_err());
    }
}
