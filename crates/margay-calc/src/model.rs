//! The iptables model the calculation produces and the driver applies.
//!
//! A [`Ruleset`] is the complete desired state of the iptables chains Margay owns, per table: every
//! owned chain with its rules, plus the few rules Margay places in the kernel's built-in chains
//! (the "jumps", such as `nat PREROUTING -> KUBE-SERVICES`). Nothing else in the kernel is Margay's:
//! other people's chains and rules are never flushed, only left alone.
//!
//! ## Rule text
//!
//! Rules are stored **without** the `-A CHAIN ` prefix, in the form `iptables-save` prints them:
//! `-s`/`-d`/`-p` first, `/32` on single addresses, comments quoted the way iptables quotes them,
//! the canonical option spelling of each extension (`--set-xmark 0x4000/0x4000` rather than
//! `--or-mark 0x4000`, `--reject-with icmp-port-unreachable` spelled out, `-m recent` with its
//! implicit `--mask` and `--rsource`). Why: the driver can then read the kernel back with
//! `iptables-save` and compare it with what it wrote, chain by chain, and a person can compare a
//! golden file with `iptables-save` output from a kube-proxy node line by line. The one exception
//! is `-m statistic --probability`, which keeps kube-proxy's ten decimals (the kernel stores a
//! 31-bit fraction and prints eleven); [`as_saved`] gives the text iptables-save will print.
//!
//! ## Restore text
//!
//! [`RestorePlan`] turns a ruleset (and optionally the previously applied one) into input for
//! `iptables-restore --noflush`, the way kube-proxy does it: a chain line `:NAME - [0:0]` creates
//! the chain or, under `--noflush`, flushes it; the chain's rules follow; `-X` deletes chains that
//! are gone. Built-in chains are never declared (that would flush other people's rules): jump rules
//! are added with `-I CHAIN 1` and removed with `-D CHAIN rule`, one restore for everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// The iptables tables Margay writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    /// Every table Margay writes, in the order restore input lists them (kube-proxy's order).
    pub const ALL: [Table; 2] = [Table::Filter, Table::Nat];

    /// The table's name as iptables spells it.
    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }

    /// The kernel's built-in chains of this table: Margay never declares (flushes) them.
    pub fn builtin_chains(self) -> &'static [&'static str] {
        match self {
            Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        }
    }

    /// Whether `chain` is one of this table's built-in chains.
    pub fn is_builtin(self, chain: &str) -> bool {
        self.builtin_chains().contains(&chain)
    }
}

/// A rule Margay keeps in a built-in chain, exactly once: a jump into one of its own chains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Jump {
    /// The built-in chain, such as `PREROUTING`.
    pub chain: String,
    /// The rule, in iptables-save form without `-A CHAIN `.
    pub rule: String,
}

impl Jump {
    pub fn new(chain: &str, rule: impl Into<String>) -> Self {
        Jump {
            chain: chain.to_owned(),
            rule: rule.into(),
        }
    }
}

/// One table's share of a [`Ruleset`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    /// Owned chains, by name, each with its rules in order (iptables-save form, no `-A NAME `).
    /// A chain with no rules still exists (kube-proxy declares its top-level chains always).
    pub chains: BTreeMap<String, Vec<String>>,
    /// Rules in built-in chains, in the top-to-bottom order they should have on a fresh system.
    pub jumps: Vec<Jump>,
}

impl TableRules {
    /// Declares `chain` (empty if new) and returns its rules.
    pub fn chain_mut(&mut self, chain: &str) -> &mut Vec<String> {
        self.chains.entry(chain.to_owned()).or_default()
    }

    /// Appends `rule` to `chain`, declaring the chain if needed.
    pub fn push(&mut self, chain: &str, rule: impl Into<String>) {
        self.chain_mut(chain).push(rule.into());
    }

    /// The number of rules in owned chains (jumps not included).
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum()
    }
}

/// The complete desired state of Margay's iptables chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub filter: TableRules,
    pub nat: TableRules,
}

impl Ruleset {
    pub fn table(&self, table: Table) -> &TableRules {
        match table {
            Table::Filter => &self.filter,
            Table::Nat => &self.nat,
        }
    }

    pub fn table_mut(&mut self, table: Table) -> &mut TableRules {
        match table {
            Table::Filter => &mut self.filter,
            Table::Nat => &mut self.nat,
        }
    }

    /// Rules in owned chains, all tables.
    pub fn rule_count(&self) -> usize {
        Table::ALL.iter().map(|t| self.table(*t).rule_count()).sum()
    }

    /// Owned chains, all tables.
    pub fn chain_count(&self) -> usize {
        Table::ALL.iter().map(|t| self.table(*t).chains.len()).sum()
    }
}

/// Chain names kube-proxy (1.28 to 1.34) gives its per-service chains, plus `KUBE-XLB-`, the
/// pre-1.24 name of `KUBE-SVL-`, so that a cleanup also removes an older kube-proxy's leftovers.
pub const SERVICE_CHAIN_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];

/// Fixed chain names Margay owns in the filter and nat tables: kube-proxy's top-level chains, the
/// kubelet-shared `KUBE-FIREWALL`, `KUBE-MARK-DROP` (created by kubelet and kube-proxy before
/// 1.28; owned so cleanup removes it), kube-proxy's canary, Margay's helper chain for clusters with
/// several pod CIDRs, the natOutgoing chain, the BPF mode's FORWARD exception, and the CNI
/// portmap plugin's hostPort chains (Margay programs hostPorts in place of the plugin).
pub const OWNED_CHAINS: [&str; 16] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
    "KUBE-FIREWALL",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-MARK-DROP",
    "KUBE-PROXY-CANARY",
    crate::kube_proxy::KUBE_MARK_MASQ_OFF_CLUSTER,
    crate::nat_outgoing::NAT_OUTGOING_CHAIN,
    crate::bpf_handover::LEGACY_BPF_FORWARD_CHAIN,
    crate::host_ports::HOSTPORT_DNAT_CHAIN,
    crate::host_ports::HOSTPORT_SETMARK_CHAIN,
    crate::host_ports::HOSTPORT_MASQ_CHAIN,
];

/// Whether a chain (in the filter or nat table) belongs to Margay: the driver rewrites, deletes
/// when stale, and cleans up exactly these chains, and removes built-in-chain rules jumping to
/// them that it does not want.
pub fn is_owned_chain(name: &str) -> bool {
    OWNED_CHAINS.contains(&name)
        || SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
        || name.starts_with(crate::host_ports::HOSTPORT_POD_CHAIN_PREFIX)
}

/// `-m comment --comment TEXT`, quoted as iptables-save quotes it.
pub fn comment(text: &str) -> String {
    format!("-m comment --comment {}", save_quote(text))
}

/// Quotes a string argument the way iptables-save does (libxtables `xtables_save_string`): bare
/// when it is only letters, digits, `_` and `-`, otherwise in double quotes with `"`, `\` and `'`
/// escaped by a backslash.
pub fn save_quote(text: &str) -> String {
    let bare = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Splits a rule into words the way iptables-restore does: whitespace separates, double quotes
/// group (and are removed), a backslash escapes the next character. Returns each word with its
/// byte span in `rule` (quotes included in the span).
pub fn split_words(rule: &str) -> Vec<(String, std::ops::Range<usize>)> {
    let mut words = Vec::new();
    let mut current: Option<(String, usize)> = None;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in rule.char_indices() {
        if escaped {
            escaped = false;
            current.get_or_insert_with(|| (String::new(), i)).0.push(c);
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                current.get_or_insert_with(|| (String::new(), i));
            }
            '"' => {
                quoted = !quoted;
                current.get_or_insert_with(|| (String::new(), i));
            }
            c if c.is_whitespace() && !quoted => {
                if let Some((word, start)) = current.take() {
                    words.push((word, start..i));
                }
            }
            c => current.get_or_insert_with(|| (String::new(), i)).0.push(c),
        }
    }
    if let Some((word, start)) = current {
        words.push((word, start..rule.len()));
    }
    words
}

/// The chain a rule jumps or goes to (`-j NAME` / `-g NAME`), if any.
pub fn rule_target(rule: &str) -> Option<String> {
    let words = split_words(rule);
    words
        .windows(2)
        .find(|w| w[0].0 == "-j" || w[0].0 == "-g" || w[0].0 == "--jump" || w[0].0 == "--goto")
        .map(|w| w[1].0.clone())
}

/// The text iptables-save prints for a rule written in [`Ruleset`] form. Only
/// `--probability P` differs: the kernel keeps `round(P * 2^31)` and iptables-save prints that
/// fraction with eleven decimals (libxt_statistic), so kube-proxy's `0.3333333333` reads back as
/// `0.33333333349`.
pub fn as_saved(rule: &str) -> String {
    let words = split_words(rule);
    let Some(pos) = words.iter().position(|(w, _)| w == "--probability") else {
        return rule.to_owned();
    };
    let Some((value, span)) = words.get(pos + 1) else {
        return rule.to_owned();
    };
    let Ok(p) = value.parse::<f64>() else {
        return rule.to_owned();
    };
    let scaled = (p * 2_147_483_648.0).round();
    let saved = format!("{:.11}", scaled / 2_147_483_648.0);
    let mut out = String::with_capacity(rule.len() + 1);
    out.push_str(&rule[..span.start]);
    out.push_str(&saved);
    out.push_str(&rule[span.end..]);
    out
}

/// What one `iptables-restore --noflush` transaction does to one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablePlan {
    /// Chains to (re)write: declared, which creates or flushes them, then filled with these rules.
    pub write: BTreeMap<String, Vec<String>>,
    /// Chains to flush and delete.
    pub delete: BTreeSet<String>,
    /// Chains to flush but keep: stale chains that a rule Margay does not own still refers to,
    /// which `-X` would refuse (and fail the whole transaction).
    pub flush: BTreeSet<String>,
    /// Rules to remove from built-in chains; each entry removes one copy.
    pub delete_jumps: Vec<Jump>,
    /// Rules to add at the top of built-in chains, listed in their final top-to-bottom order.
    pub insert_jumps: Vec<Jump>,
    /// Comment lines (`# ...`) for people reading the text; iptables-restore ignores them.
    pub notes: Vec<String>,
}

impl TablePlan {
    /// Whether the plan changes nothing (notes do not count).
    pub fn is_empty(&self) -> bool {
        self.write.is_empty()
            && self.delete.is_empty()
            && self.flush.is_empty()
            && self.delete_jumps.is_empty()
            && self.insert_jumps.is_empty()
    }

    fn render(&self, table: Table, out: &mut String) {
        let _ = writeln!(out, "*{}", table.name());
        let declared: BTreeSet<&String> = self
            .write
            .keys()
            .chain(&self.flush)
            .chain(&self.delete)
            .collect();
        for chain in declared {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for jump in &self.delete_jumps {
            let _ = writeln!(out, "-D {} {}", jump.chain, jump.rule);
        }
        for (chain, rules) in &self.write {
            for rule in rules {
                let _ = writeln!(out, "-A {chain} {rule}");
            }
        }
        // Each insert goes to position 1, so inserting in reverse leaves them in listed order.
        for jump in self.insert_jumps.iter().rev() {
            let _ = writeln!(out, "-I {} 1 {}", jump.chain, jump.rule);
        }
        for chain in &self.delete {
            let _ = writeln!(out, "-X {chain}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "# {note}");
        }
        out.push_str("COMMIT\n");
    }
}

/// One `iptables-restore --noflush` transaction over the tables Margay writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestorePlan {
    pub filter: TablePlan,
    pub nat: TablePlan,
}

impl RestorePlan {
    pub fn table(&self, table: Table) -> &TablePlan {
        match table {
            Table::Filter => &self.filter,
            Table::Nat => &self.nat,
        }
    }

    pub fn table_mut(&mut self, table: Table) -> &mut TablePlan {
        match table {
            Table::Filter => &mut self.filter,
            Table::Nat => &mut self.nat,
        }
    }

    /// Writes every chain of `new`. Knows nothing of the kernel: stale chains and the built-in
    /// jumps are the caller's to add (the driver adds them from iptables-save).
    pub fn full(new: &Ruleset) -> Self {
        let mut plan = RestorePlan::default();
        for table in Table::ALL {
            plan.table_mut(table).write = new.table(table).chains.clone();
        }
        plan
    }

    /// Rewrites only what changed since `old` (which must be what the kernel holds): new and
    /// changed chains are declared and written, chains that disappeared are flushed and deleted,
    /// and jumps are added or removed. Unchanged chains are not mentioned, so their rules and
    /// counters stay as they are.
    pub fn diff(new: &Ruleset, old: &Ruleset) -> Self {
        let mut plan = RestorePlan::default();
        for table in Table::ALL {
            let (new, old) = (new.table(table), old.table(table));
            let tp = plan.table_mut(table);
            tp.write = new
                .chains
                .iter()
                .filter(|(name, rules)| old.chains.get(*name) != Some(*rules))
                .map(|(name, rules)| (name.clone(), rules.clone()))
                .collect();
            tp.delete = old
                .chains
                .keys()
                .filter(|name| !new.chains.contains_key(*name))
                .cloned()
                .collect();
            // Insertions go to the top of their chain: where a jump is added, the chain's
            // other wanted jumps are deleted and inserted again with it, in their order, so
            // that one that must come first (the accept of BPF-translated packets, ahead of
            // KUBE-FORWARD) stays first.
            let redo: BTreeSet<&str> = new
                .jumps
                .iter()
                .filter(|j| !old.jumps.contains(j))
                .map(|j| j.chain.as_str())
                .collect();
            tp.delete_jumps = old
                .jumps
                .iter()
                .filter(|j| !new.jumps.contains(j) || redo.contains(j.chain.as_str()))
                .cloned()
                .collect();
            tp.insert_jumps = new
                .jumps
                .iter()
                .filter(|j| !old.jumps.contains(j) || redo.contains(j.chain.as_str()))
                .cloned()
                .collect();
        }
        plan
    }

    /// Whether the plan changes nothing; the driver then runs no process at all.
    pub fn is_empty(&self) -> bool {
        Table::ALL.iter().all(|t| self.table(*t).is_empty())
    }

    /// The iptables-restore input. Tables the plan does not change are left out.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for table in Table::ALL {
            let tp = self.table(table);
            if !tp.is_empty() {
                tp.render(table, &mut out);
            }
        }
        out
    }

    /// Chains declared and written.
    pub fn chains_written(&self) -> usize {
        Table::ALL.iter().map(|t| self.table(*t).write.len()).sum()
    }

    /// Rules appended to written chains.
    pub fn rules_written(&self) -> usize {
        Table::ALL
            .iter()
            .map(|t| self.table(*t).write.values().map(Vec::len).sum::<usize>())
            .sum()
    }

    /// Chains deleted.
    pub fn chains_deleted(&self) -> usize {
        Table::ALL.iter().map(|t| self.table(*t).delete.len()).sum()
    }

    /// Stale chains flushed but kept because someone else refers to them.
    pub fn chains_flushed(&self) -> usize {
        Table::ALL.iter().map(|t| self.table(*t).flush.len()).sum()
    }

    /// Jump rules inserted into built-in chains.
    pub fn jumps_inserted(&self) -> usize {
        Table::ALL
            .iter()
            .map(|t| self.table(*t).insert_jumps.len())
            .sum()
    }

    /// Jump rules removed from built-in chains.
    pub fn jumps_deleted(&self) -> usize {
        Table::ALL
            .iter()
            .map(|t| self.table(*t).delete_jumps.len())
            .sum()
    }
}

/// iptables-restore input for `new`, kube-proxy style.
///
/// - Without `old`: every chain of `new` is declared (created, or flushed under `--noflush`) and
///   written. The built-in-chain jumps are listed as `#` comment lines: whether they must be
///   added depends on what the kernel holds, which only the driver knows (it reads iptables-save
///   and adds `-I`/`-D` lines to the same transaction). Stale chains are likewise the driver's.
/// - With `old` (what the kernel holds now): only new or changed chains are declared and written;
///   chains that disappeared are flushed and deleted; jumps that appeared or disappeared are
///   inserted or deleted. Declaring an unchanged chain would flush it, so unchanged chains are not
///   mentioned at all.
pub fn ruleset_to_restore(new: &Ruleset, old: Option<&Ruleset>) -> String {
    let plan = match old {
        Some(old) => RestorePlan::diff(new, old),
        None => {
            let mut plan = RestorePlan::full(new);
            for table in Table::ALL {
                plan.table_mut(table).notes = new
                    .table(table)
                    .jumps
                    .iter()
                    .map(|j| {
                        format!(
                            "jump, kept exactly once by the driver: -A {} {}",
                            j.chain, j.rule
                        )
                    })
                    .collect();
            }
            plan
        }
    };
    plan.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_follows_iptables_save() {
        assert_eq!(save_quote("x"), "x");
        assert_eq!(save_quote("KUBE-SVC-X_1"), "KUBE-SVC-X_1");
        assert_eq!(save_quote("ns/svc:p"), "\"ns/svc:p\"");
        assert_eq!(save_quote("a b"), "\"a b\"");
        assert_eq!(save_quote("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(save_quote(""), "\"\"");
    }

    #[test]
    fn words_respect_quotes_and_escapes() {
        let words: Vec<String> = split_words(r#"-m comment --comment "a -j b \"c\"" -j X"#)
            .into_iter()
            .map(|(w, _)| w)
            .collect();
        assert_eq!(
            words,
            ["-m", "comment", "--comment", "a -j b \"c\"", "-j", "X"]
        );
        assert_eq!(
            rule_target(r#"-m comment --comment "x -j Y" -j KUBE-SVC-A"#).as_deref(),
            Some("KUBE-SVC-A")
        );
        assert_eq!(rule_target("-m comment --comment x").as_deref(), None);
    }

    #[test]
    fn probability_reads_back_as_the_kernel_prints_it() {
        let rule = "-m comment --comment \"a -> b\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-X";
        assert_eq!(
            as_saved(rule),
            "-m comment --comment \"a -> b\" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-X"
        );
        assert_eq!(
            as_saved("-m statistic --mode random --probability 0.5000000000 -j A"),
            "-m statistic --mode random --probability 0.50000000000 -j A"
        );
        assert_eq!(
            as_saved("-m statistic --mode random --probability 0.1000000000 -j A"),
            "-m statistic --mode random --probability 0.10000000009 -j A"
        );
        assert_eq!(as_saved("-j A"), "-j A");
    }

    #[test]
    fn ownership() {
        assert!(is_owned_chain("KUBE-SERVICES"));
        assert!(is_owned_chain("KUBE-SEP-ABCDEF"));
        assert!(is_owned_chain("cali-nat-outgoing"));
        assert!(!is_owned_chain("KUBE-KUBELET-CANARY"));
        assert!(!is_owned_chain("DOCKER"));
        assert!(!is_owned_chain("INPUT"));
    }

    fn sample(rules_a: &[&str], with_b: bool, jumps: &[(&str, &str)]) -> Ruleset {
        let mut rs = Ruleset::default();
        for r in rules_a {
            rs.nat.push("KUBE-SVC-A", *r);
        }
        if with_b {
            rs.nat
                .push("KUBE-SEP-B", "-j DNAT --to-destination 1.2.3.4:80");
        }
        rs.nat.jumps = jumps.iter().map(|(c, r)| Jump::new(c, *r)).collect();
        rs
    }

    #[test]
    fn diff_touches_only_changed_chains() {
        let old = sample(
            &["-j KUBE-SEP-B"],
            true,
            &[("PREROUTING", "-j KUBE-SERVICES")],
        );
        let new = sample(&["-j KUBE-SEP-C"], false, &[("OUTPUT", "-j KUBE-SERVICES")]);
        let text = ruleset_to_restore(&new, Some(&old));
        assert_eq!(
            text,
            "*nat\n\
             :KUBE-SEP-B - [0:0]\n\
             :KUBE-SVC-A - [0:0]\n\
             -D PREROUTING -j KUBE-SERVICES\n\
             -A KUBE-SVC-A -j KUBE-SEP-C\n\
             -I OUTPUT 1 -j KUBE-SERVICES\n\
             -X KUBE-SEP-B\n\
             COMMIT\n"
        );
        assert_eq!(ruleset_to_restore(&old, Some(&old)), "");
    }

    #[test]
    fn inserts_keep_their_listed_order() {
        let mut plan = RestorePlan::default();
        plan.filter.insert_jumps = vec![Jump::new("INPUT", "-j A"), Jump::new("INPUT", "-j B")];
        assert_eq!(
            plan.render(),
            "*filter\n-I INPUT 1 -j B\n-I INPUT 1 -j A\nCOMMIT\n"
        );
    }
}
