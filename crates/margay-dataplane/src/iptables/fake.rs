//! An in-memory iptables for tests that cannot be root, with failure knobs.
//!
//! It applies `iptables-restore --noflush` input the way the kernel does where it matters to
//! the driver: the whole input is one transaction (any error leaves everything as it was); a
//! chain line creates a chain or flushes an existing user chain, and leaves a built-in chain
//! alone; `-A`, `-I CHAIN [N]`, `-D CHAIN RULE|N`, `-F`, `-N`, `-X`; `-X` refuses built-in,
//! missing, non-empty and referenced chains; a jump to a chain that does not exist fails; `-D`
//! of a rule that is not there fails. Rules are stored as iptables-save would print them
//! ([`margay_calc::model::as_saved`]). It does not check match or target syntax: the privileged
//! tests do that against the real kernel.

use margay_calc::Table;
use margay_calc::model::{as_saved, rule_target};

use super::save::{SavedTable, SavedTables};
use super::{IptablesBackend, IptablesError};

/// Targets that are not chains (extensions Margay's rules and common rules use).
const TARGETS: [&str; 15] = [
    "ACCEPT",
    "DROP",
    "RETURN",
    "REJECT",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
    "CONNMARK",
    "REDIRECT",
    "LOG",
    "NOTRACK",
    "CT",
    "QUEUE",
    "NFQUEUE",
];

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct FakeIptables {
    /// What the "kernel" holds. Tests may change it to simulate someone else's writes.
    pub tables: SavedTables,
    /// Every restore input received, whether it succeeded or not.
    pub restores: Vec<String>,
    /// How many times iptables-save was run.
    pub saves: usize,
    fail_next_restore: Option<String>,
    fail_next_save: Option<String>,
}

impl Default for FakeIptables {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeIptables {
    /// A fresh network namespace: filter and nat with their empty built-in chains.
    pub fn new() -> Self {
        let mut tables = SavedTables::default();
        for table in Table::ALL {
            tables
                .tables
                .insert(table.name().to_owned(), SavedTable::fresh(table));
        }
        FakeIptables {
            tables,
            restores: Vec::new(),
            saves: 0,
            fail_next_restore: None,
            fail_next_save: None,
        }
    }

    /// The next restore fails with `message` and changes nothing.
    pub fn fail_next_restore(&mut self, message: &str) {
        self.fail_next_restore = Some(message.to_owned());
    }

    /// The next save fails with `message`.
    pub fn fail_next_save(&mut self, message: &str) {
        self.fail_next_save = Some(message.to_owned());
    }

    /// The rules of `chain` in `table`, if the chain exists.
    pub fn chain(&self, table: Table, chain: &str) -> Option<&Vec<String>> {
        self.tables.table(table).and_then(|t| t.chains.get(chain))
    }

    /// Applies restore input as one transaction; the error names the failing line.
    pub fn apply(&mut self, input: &str) -> Result<(), String> {
        let mut work = self.tables.clone();
        let mut current: Option<String> = None;
        for (index, raw) in input.lines().enumerate() {
            let line = raw.trim();
            let fail = |message: String| format!("line {}: {message}", index + 1);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                let table = match name {
                    "filter" => Table::Filter,
                    "nat" => Table::Nat,
                    other => return Err(fail(format!("table {other} is not simulated"))),
                };
                work.tables
                    .entry(name.to_owned())
                    .or_insert_with(|| SavedTable::fresh(table));
                current = Some(name.to_owned());
                continue;
            }
            let Some(table_name) = current.clone() else {
                return Err(fail("no table selected".to_owned()));
            };
            if line == "COMMIT" {
                current = None;
                continue;
            }
            let table = work
                .tables
                .get_mut(&table_name)
                .ok_or_else(|| fail("table vanished".to_owned()))?;
            let builtin = |c: &str| {
                matches!(
                    c,
                    "INPUT" | "OUTPUT" | "FORWARD" | "PREROUTING" | "POSTROUTING"
                )
            };
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if !builtin(&name) {
                    // Creates the chain, or flushes it under --noflush.
                    table.chains.insert(name, Vec::new());
                }
                continue;
            }
            let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
            let (chain, args) = rest.split_once(' ').unwrap_or((rest, ""));
            let chain = chain.to_owned();
            if chain.is_empty() {
                return Err(fail(format!("{op} needs a chain")));
            }
            let exists = table.chains.contains_key(&chain);
            let check_target = |table: &SavedTable, rule: &str| -> Result<(), String> {
                match rule_target(rule) {
                    Some(t) if !TARGETS.contains(&t.as_str()) && !table.chains.contains_key(&t) => {
                        Err(fail(format!("Chain '{t}' does not exist")))
                    }
                    _ => Ok(()),
                }
            };
            match op {
                "-A" => {
                    if !exists {
                        return Err(fail(format!("Chain '{chain}' does not exist")));
                    }
                    check_target(table, args)?;
                    if let Some(rules) = table.chains.get_mut(&chain) {
                        rules.push(as_saved(args));
                    }
                }
                "-I" => {
                    if !exists {
                        return Err(fail(format!("Chain '{chain}' does not exist")));
                    }
                    let (position, rule) = match args.split_once(' ') {
                        Some((n, rule)) if n.parse::<usize>().is_ok() => {
                            (n.parse::<usize>().unwrap_or(1), rule)
                        }
                        _ => (1, args),
                    };
                    check_target(table, rule)?;
                    if let Some(rules) = table.chains.get_mut(&chain) {
                        if position == 0 || position > rules.len() + 1 {
                            return Err(fail("Index of insertion too big".to_owned()));
                        }
                        rules.insert(position - 1, as_saved(rule));
                    }
                }
                "-D" => {
                    let Some(rules) = table.chains.get_mut(&chain) else {
                        return Err(fail(format!("Chain '{chain}' does not exist")));
                    };
                    let index = match args.parse::<usize>() {
                        Ok(n) if n >= 1 && n <= rules.len() => Some(n - 1),
                        Ok(_) => None,
                        Err(_) => {
                            let wanted = as_saved(args);
                            rules.iter().position(|r| *r == wanted)
                        }
                    };
                    let Some(index) = index else {
                        return Err(fail(
                            "Bad rule (does a matching rule exist in that chain?)".to_owned(),
                        ));
                    };
                    rules.remove(index);
                }
                "-F" => {
                    let Some(rules) = table.chains.get_mut(&chain) else {
                        return Err(fail(format!("Chain '{chain}' does not exist")));
                    };
                    rules.clear();
                }
                "-N" => {
                    if exists {
                        return Err(fail("Chain already exists".to_owned()));
                    }
                    table.chains.insert(chain, Vec::new());
                }
                "-X" => {
                    if builtin(&chain) {
                        return Err(fail("Can't delete built-in chain".to_owned()));
                    }
                    let Some(rules) = table.chains.get(&chain) else {
                        return Err(fail(format!("Chain '{chain}' does not exist")));
                    };
                    if !rules.is_empty() {
                        return Err(fail(format!("chain {chain} is not empty")));
                    }
                    let referenced = table
                        .chains
                        .values()
                        .flatten()
                        .any(|r| rule_target(r).as_deref() == Some(chain.as_str()));
                    if referenced {
                        return Err(fail(format!(
                            "CHAIN_DEL failed (Device or resource busy): chain {chain}"
                        )));
                    }
                    table.chains.remove(&chain);
                }
                other => return Err(fail(format!("unknown command {other}"))),
            }
        }
        if current.is_some() {
            return Err("input ends without COMMIT".to_owned());
        }
        self.tables = work;
        Ok(())
    }
}

impl IptablesBackend for FakeIptables {
    fn save(&mut self) -> Result<String, IptablesError> {
        if let Some(message) = self.fail_next_save.take() {
            return Err(IptablesError::Failed {
                program: "iptables-save (fake)".to_owned(),
                status: "exit status: 1".to_owned(),
                stderr: message,
                context: String::new(),
            });
        }
        self.saves += 1;
        Ok(self.tables.render())
    }

    fn restore(&mut self, input: &str) -> Result<(), IptablesError> {
        self.restores.push(input.to_owned());
        let result = match self.fail_next_restore.take() {
            Some(message) => Err(message),
            None => self.apply(input),
        };
        result.map_err(|stderr| IptablesError::Failed {
            program: "iptables-restore (fake)".to_owned(),
            status: "exit status: 1".to_owned(),
            context: super::restore_context(input, &stderr),
            stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_is_all_or_nothing() {
        let mut fake = FakeIptables::new();
        fake.apply("*nat\n:A - [0:0]\n-A A -j RETURN\nCOMMIT\n")
            .unwrap();
        let before = fake.tables.clone();
        // The second table fails: the first table's change must not stay either.
        let err = fake
            .apply("*filter\n:B - [0:0]\nCOMMIT\n*nat\n-X A\nCOMMIT\n")
            .unwrap_err();
        assert!(err.contains("not empty"), "{err}");
        assert_eq!(fake.tables, before);
    }

    #[test]
    fn chain_rules_follow_the_kernel() {
        let mut fake = FakeIptables::new();
        fake.apply("*nat\n:A - [0:0]\n:B - [0:0]\n-A A -j B\n-I PREROUTING 1 -j A\nCOMMIT\n")
            .unwrap();
        // Declaring B again flushes it; deleting it while A refers to it fails.
        assert!(
            fake.apply("*nat\n:B - [0:0]\n-X B\nCOMMIT\n")
                .unwrap_err()
                .contains("busy")
        );
        // A jump to a missing chain fails.
        assert!(
            fake.apply("*nat\n-A A -j C\nCOMMIT\n")
                .unwrap_err()
                .contains("'C'")
        );
        // Deleting a rule that is not there fails.
        assert!(fake.apply("*nat\n-D PREROUTING -j B\nCOMMIT\n").is_err());
        fake.apply("*nat\n:A - [0:0]\n-D PREROUTING -j A\n-X A\n-X B\nCOMMIT\n")
            .unwrap();
        assert_eq!(fake.chain(Table::Nat, "PREROUTING").unwrap().len(), 0);
        assert!(fake.chain(Table::Nat, "A").is_none());
    }
}
