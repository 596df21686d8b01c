//! Calico's label selector language (`all()`, `has(k)`, `k == "v"`, `k in {"a", "b"}`, `!`, `&&`,
//! `||`, parentheses), parsed so that a bad selector is refused when written and a good one can be
//! evaluated against labels (IP pools' `nodeSelector`).

use std::collections::BTreeMap;

use crate::error::{Validation, fail};

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    All,
    Has(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

impl Selector {
    /// Parses a selector; the empty string selects everything, as in Calico.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        p.skip_ws();
        if p.i == p.s.len() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.skip_ws();
        if p.i != p.s.len() {
            return Err(format!("unexpected {:?} at offset {}", p.rest(), p.i));
        }
        Ok(sel)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Equals(k, v) => labels.get(k) == Some(v),
            Selector::NotEquals(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Selector::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

/// Refuses a selector that does not parse, naming the field.
pub fn check_selector(path: &str, text: &str) -> Validation {
    match Selector::parse(text) {
        Ok(_) => Ok(()),
        Err(why) => fail(path, format!("{text:?} is not a valid selector: {why}")),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn rest(&self) -> String {
        String::from_utf8_lossy(&self.s[self.i..]).into_owned()
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.s[self.i..].starts_with(token.as_bytes()) {
            self.i += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), String> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(format!("expected {token:?} at offset {}", self.i))
        }
    }

    fn or(&mut self) -> Result<Selector, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Selector::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Selector, String> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Selector::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Selector, String> {
        self.skip_ws();
        if self.s[self.i..].starts_with(b"!") && !self.s[self.i..].starts_with(b"!=") {
            self.i += 1;
            return Ok(Selector::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        if self.eat("all()") || self.eat("global()") {
            return Ok(Selector::All);
        }
        if self.eat("has(") {
            let key = self.key()?;
            self.expect(")")?;
            return Ok(Selector::Has(key));
        }
        let key = self.key()?;
        if self.eat("==") {
            return Ok(Selector::Equals(key, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::NotEquals(key, self.string()?));
        }
        if self.eat("not in") {
            return Ok(Selector::NotIn(key, self.set()?));
        }
        if self.eat("in") {
            return Ok(Selector::In(key, self.set()?));
        }
        Err(format!(
            "expected ==, !=, in or not in after {key:?} at offset {}",
            self.i
        ))
    }

    fn key(&mut self) -> Result<String, String> {
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || b"-_./".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        if start == self.i {
            return Err(format!("expected a label key at offset {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn string(&mut self) -> Result<String, String> {
        self.skip_ws();
        let quote = *self
            .s
            .get(self.i)
            .ok_or("expected a quoted value at the end")?;
        if quote != b'"' && quote != b'\'' {
            return Err(format!("expected a quoted value at offset {}", self.i));
        }
        let start = self.i + 1;
        let len = self.s[start..]
            .iter()
            .position(|&b| b == quote)
            .ok_or_else(|| format!("unterminated string at offset {}", self.i))?;
        self.i = start + len + 1;
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }

    fn set(&mut self) -> Result<Vec<String>, String> {
        self.expect("{")?;
        let mut values = Vec::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
            values.push(self.string()?);
            if self.eat("}") {
                return Ok(values);
            }
            self.expect(",")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_and_matches() {
        let l = labels(&[("zone", "a"), ("role", "worker")]);
        for (text, want) in [
            ("all()", true),
            ("", true),
            ("has(zone)", true),
            ("!has(gpu)", true),
            ("zone == 'a'", true),
            ("zone != \"a\"", false),
            ("zone in {'a', 'b'}", true),
            ("zone not in {'a'}", false),
            ("has(zone) && role == 'worker'", true),
            ("role == 'master' || (zone == 'a' && !has(gpu))", true),
        ] {
            let sel = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(sel.matches(&l), want, "{text}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "all(",
            "zone = 'a'",
            "zone == a",
            "has(zone",
            "&&",
            "zone in {'a'",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
