//! The iptables driver: makes the kernel's filter and nat tables hold a [`Ruleset`].
//!
//! ## Model
//!
//! Margay owns a set of chains (kube-proxy's `KUBE-*` chains and `cali-nat-outgoing`, see
//! [`margay_calc::model::is_owned_chain`]) and a few rules in the built-in chains (the jumps into
//! them). Everything else in the kernel belongs to someone else and is never flushed: built-in
//! chains are never declared in restore input, jumps are inserted and deleted one by one.
//!
//! Every sync is **one** `iptables-restore --noflush` process reading one transaction from stdin,
//! as kube-proxy does; never one process per rule.
//!
//! - **Full sync** (the first, after any failure, after [`IptablesDriver::request_full_sync`],
//!   and once per [`IptablesDriver::set_full_sync_period`], an hour by default like kube-proxy):
//!   reads the kernel with one `iptables-save`, then declares and writes every chain of the
//!   ruleset, flushes and deletes owned chains that are no longer wanted (a stale chain that
//!   someone else's rule still refers to is flushed and kept: `-X` would fail the whole
//!   transaction), inserts missing jumps, and deletes duplicate jumps and stale jumps into owned
//!   chains, so that each jump exists exactly once.
//! - **Partial sync** (otherwise): no `iptables-save`; only chains that changed since the last
//!   successful sync are declared and written, disappeared ones deleted
//!   ([`RestorePlan::diff`]). Unchanged chains keep their rules and counters. Nothing changed,
//!   no process at all.
//! - **Failure**: a failed partial restore changed nothing (the transaction is atomic), but the
//!   kernel evidently is not what the driver believed, so the same call falls back to a full sync
//!   right away (kube-proxy waits for its next period). A failed full sync returns the error and
//!   the next call starts with a full sync again.
//!
//! [`IptablesDriver::verify`] compares the kernel with a ruleset (drift detection, tests);
//! [`IptablesDriver::cleanup`] removes every owned chain and jump (BPF mode's
//! `bpfKubeProxyIptablesCleanupEnabled`, and uninstall), a real kube-proxy's leftovers included.
//!
//! The driver works on the network namespace of the calling thread: the agent runs inside its
//! node's namespace; tests call it from a thread that entered theirs. It blocks while the
//! iptables processes run (milliseconds to a second): from async code, call it through
//! `spawn_blocking`. How it talks to the kernel is an [`IptablesBackend`]: [`SystemIptables`]
//! runs the real tools, [`FakeIptables`] simulates them in memory for tests without root.

mod fake;
mod save;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use margay_calc::model::{as_saved, is_owned_chain, rule_target};
use margay_calc::{Jump, RestorePlan, Ruleset, Table};

pub use fake::FakeIptables;
pub use save::{SaveParseError, SavedTable, SavedTables};

// === Errors ===

/// Why talking to iptables failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}{context}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
        /// The restore input lines around the line the error names, when it names one.
        context: String,
    },
    #[error(transparent)]
    Parse(#[from] SaveParseError),
}

/// The input lines around the line number an iptables-restore error message names ("line 12"),
/// as kube-proxy logs them, so that a failure can be understood from the log alone.
pub(crate) fn restore_context(input: &str, stderr: &str) -> String {
    let Some(at) = stderr.find("line ") else {
        return String::new();
    };
    let digits: String = stderr[at + 5..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let Ok(line) = digits.parse::<usize>() else {
        return String::new();
    };
    let lines: Vec<&str> = input.lines().collect();
    let first = line.saturating_sub(2);
    let last = (line + 1).min(lines.len());
    let mut out = String::from("\ninput around the failing line:");
    for (i, text) in lines.iter().enumerate().take(last).skip(first) {
        let marker = if i + 1 == line { ">" } else { " " };
        out.push_str(&format!("\n{marker}{:5} {text}", i + 1));
    }
    out
}

// === Backends ===

/// How the driver reads and writes the kernel's tables.
pub trait IptablesBackend: fmt::Debug + Send {
    /// `iptables-save` of every table.
    fn save(&mut self) -> Result<String, IptablesError>;
    /// `iptables-restore --noflush` with `input` on stdin, as one transaction.
    fn restore(&mut self, input: &str) -> Result<(), IptablesError>;
}

/// The real `iptables-save` and `iptables-restore`, whichever backend (nft or legacy) the
/// system's `iptables` is.
#[derive(Debug, Clone)]
pub struct SystemIptables {
    pub save_program: PathBuf,
    pub restore_program: PathBuf,
    /// `-w`: how long iptables-restore waits for the xtables lock (legacy backend only; the nft
    /// backend takes no lock and ignores it).
    pub wait_seconds: u32,
}

impl Default for SystemIptables {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemIptables {
    /// Finds the tools on `PATH`, then in `/usr/sbin` and `/sbin` (root's usual places, which a
    /// service's `PATH` may lack).
    pub fn new() -> Self {
        SystemIptables {
            save_program: find_program("iptables-save"),
            restore_program: find_program("iptables-restore"),
            wait_seconds: 5,
        }
    }

    /// The tools of one backend (`iptables-legacy-save`, `iptables-nft-restore`...), whatever
    /// the system's `iptables` points at.
    pub fn for_mode(mode: IptablesMode) -> Self {
        SystemIptables {
            save_program: find_program(&format!("iptables-{mode}-save")),
            restore_program: find_program(&format!("iptables-{mode}-restore")),
            wait_seconds: 5,
        }
    }
}

/// The two implementations behind the `iptables` tools: the kernel's x_tables (`legacy`) and
/// nf_tables through the compatibility layer (`nft`). They keep separate tables, so rules written
/// with one are invisible to the other's save; Calico's `iptablesBackend` chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptablesMode {
    Legacy,
    Nft,
}

impl IptablesMode {
    /// The word the tools use (`iptables-legacy-save`, `iptables v1.8.9 (legacy)`).
    pub fn as_str(self) -> &'static str {
        match self {
            IptablesMode::Legacy => "legacy",
            IptablesMode::Nft => "nft",
        }
    }

    /// What `iptables --version` says the system's default tools are (`(nf_tables)` or
    /// `(legacy)`); `None` when it cannot be run or says neither.
    pub fn system_default() -> Option<IptablesMode> {
        let text = run(&find_program("iptables"), &["--version"], None).ok()?;
        if text.contains("nf_tables") {
            Some(IptablesMode::Nft)
        } else if text.contains("legacy") {
            Some(IptablesMode::Legacy)
        } else {
            None
        }
    }

    /// Calico's `iptablesBackend: Auto` for the calling thread's network namespace: the backend
    /// that already holds rules (more `-A` lines in its save output: kube-proxy's, a previous
    /// agent's), else the system's default tools, else nft. Like Felix and Kubernetes'
    /// iptables-wrappers, whose point is to join whichever backend the node already uses.
    pub fn detect() -> IptablesMode {
        let rules = |mode: IptablesMode| {
            SystemIptables::for_mode(mode).save().map_or(0, |text| {
                text.lines().filter(|l| l.starts_with("-A ")).count()
            })
        };
        let (legacy, nft) = (rules(IptablesMode::Legacy), rules(IptablesMode::Nft));
        match legacy.cmp(&nft) {
            std::cmp::Ordering::Greater => IptablesMode::Legacy,
            std::cmp::Ordering::Less => IptablesMode::Nft,
            std::cmp::Ordering::Equal => Self::system_default().unwrap_or(IptablesMode::Nft),
        }
    }
}

impl fmt::Display for IptablesMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let name = program.display().to_string();
    let spawn_error = |source| IptablesError::Spawn {
        program: name.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    // Feed stdin from another thread while this one drains stdout and stderr, so that neither
    // side can block the other on a full pipe.
    let output = std::thread::scope(|scope| {
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            scope.spawn(move || {
                // A write error means the child exited early; its status says why.
                let _ = pipe.write_all(text.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(spawn_error)?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    Err(IptablesError::Failed {
        program: name,
        status: output.status.to_string(),
        context: stdin
            .map(|s| restore_context(s, &stderr))
            .unwrap_or_default(),
        stderr,
    })
}

impl IptablesBackend for SystemIptables {
    fn save(&mut self) -> Result<String, IptablesError> {
        run(&self.save_program, &[], None)
    }

    fn restore(&mut self, input: &str) -> Result<(), IptablesError> {
        let wait = self.wait_seconds.to_string();
        run(
            &self.restore_program,
            &["--noflush", "-w", &wait],
            Some(input),
        )
        .map(|_| ())
    }
}

// === Reports ===

/// What one [`IptablesDriver::sync`] did and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether this sync read the kernel and rewrote every chain.
    pub full: bool,
    /// When a partial restore failed and the driver fell back to a full sync: its error.
    pub fell_back: Option<String>,
    /// The whole call.
    pub duration: Duration,
    /// Time spent in iptables-save (zero for partial syncs).
    pub save_duration: Duration,
    /// Time spent in iptables-restore.
    pub restore_duration: Duration,
    /// iptables processes run: 0 when nothing changed, 1 for a partial sync, 2 for a full one.
    pub processes: usize,
    /// Size of the last restore input.
    pub restore_bytes: usize,
    pub chains_written: usize,
    pub rules_written: usize,
    pub chains_deleted: usize,
    /// Stale chains flushed but kept because a rule Margay does not own refers to them.
    pub chains_flushed: usize,
    pub jumps_inserted: usize,
    pub jumps_deleted: usize,
}

impl SyncReport {
    fn count(&mut self, plan: &RestorePlan) {
        self.chains_written = plan.chains_written();
        self.rules_written = plan.rules_written();
        self.chains_deleted = plan.chains_deleted();
        self.chains_flushed = plan.chains_flushed();
        self.jumps_inserted = plan.jumps_inserted();
        self.jumps_deleted = plan.jumps_deleted();
    }
}

/// What [`IptablesDriver::cleanup`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub duration: Duration,
    pub chains_deleted: usize,
    pub jumps_deleted: usize,
    /// Owned chains that someone else's rules still refer to: flushed, but not deleted.
    pub chains_left: Vec<(Table, String)>,
}

/// A difference between the kernel and a ruleset, found by [`IptablesDriver::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    MissingChain {
        table: Table,
        chain: String,
    },
    ChainDiffers {
        table: Table,
        chain: String,
        /// The ruleset's rules, as iptables-save prints them.
        expected: Vec<String>,
        actual: Vec<String>,
    },
    /// An owned chain the ruleset does not have.
    UnexpectedChain {
        table: Table,
        chain: String,
    },
    /// A wanted jump present `count` times instead of once.
    JumpCount {
        table: Table,
        jump: Jump,
        count: usize,
    },
    /// A rule in a built-in chain jumping to an owned chain, that the ruleset does not want.
    UnexpectedJump {
        table: Table,
        jump: Jump,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::MissingChain { table, chain } => {
                write!(f, "{}: chain {chain} is missing", table.name())
            }
            Drift::ChainDiffers {
                table,
                chain,
                expected,
                actual,
            } => write!(
                f,
                "{}: chain {chain} differs\n  expected:\n    {}\n  actual:\n    {}",
                table.name(),
                expected.join("\n    "),
                actual.join("\n    ")
            ),
            Drift::UnexpectedChain { table, chain } => {
                write!(f, "{}: owned chain {chain} should not exist", table.name())
            }
            Drift::JumpCount { table, jump, count } => write!(
                f,
                "{}: -A {} {} is present {count} times",
                table.name(),
                jump.chain,
                jump.rule
            ),
            Drift::UnexpectedJump { table, jump } => write!(
                f,
                "{}: -A {} {} should not exist",
                table.name(),
                jump.chain,
                jump.rule
            ),
        }
    }
}

// === Plans from what the kernel holds ===

/// Chains that rules outside Margay's chains (and outside built-in chains, whose rules into
/// owned chains Margay manages) jump or go to.
fn foreign_references(table: Table, have: &SavedTable) -> BTreeSet<String> {
    have.chains
        .iter()
        .filter(|(name, _)| !is_owned_chain(name) && !table.is_builtin(name))
        .flat_map(|(_, rules)| rules.iter().filter_map(|r| rule_target(r)))
        .collect()
}

/// A rule in a built-in chain that Margay owns: a jump into an owned chain, or a rule of its own
/// there (its comment starts with "margay: ", e.g. the accept of what the BPF programs translated).
fn is_owned_builtin_rule(rule: &str) -> bool {
    rule_target(rule).is_some_and(|t| is_owned_chain(&t)) || rule.contains("--comment \"margay: ")
}

/// For each built-in chain: which wanted jumps are missing (to insert), and which rules to
/// delete (extra copies of wanted jumps, and rules into owned chains that are not wanted).
fn jump_fixes(table: Table, jumps: &[Jump], have: &SavedTable) -> (Vec<Jump>, Vec<Jump>) {
    let mut seen: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut delete = Vec::new();
    for chain in table.builtin_chains() {
        for rule in have.chains.get(*chain).into_iter().flatten() {
            let wanted = jumps
                .iter()
                .any(|j| j.chain == *chain && as_saved(&j.rule) == *rule);
            if wanted {
                let count = seen.entry((chain, rule.clone())).or_default();
                *count += 1;
                if *count > 1 {
                    delete.push(Jump::new(chain, rule.clone()));
                }
            } else if is_owned_builtin_rule(rule) {
                delete.push(Jump::new(chain, rule.clone()));
            }
        }
    }
    let missing = |j: &Jump| !seen.contains_key(&(j.chain.as_str(), as_saved(&j.rule)));
    // Insertions go to the top of their chain: where one is missing, the chain's wanted jumps
    // that are there are deleted and all are inserted again in their order (one transaction),
    // so that a jump that must come first (the accept of BPF-translated packets, ahead of
    // KUBE-FORWARD) stays first when the others come back.
    let redo: BTreeSet<&str> = jumps
        .iter()
        .filter(|j| missing(j))
        .map(|j| j.chain.as_str())
        .collect();
    let mut insert = Vec::new();
    for j in jumps {
        if redo.contains(j.chain.as_str()) {
            if !missing(j) {
                delete.push(Jump::new(&j.chain, as_saved(&j.rule)));
            }
            insert.push(j.clone());
        }
    }
    (delete, insert)
}

/// The full sync's transaction: every chain of `desired`, stale owned chains removed, jumps
/// fixed so each exists exactly once.
pub fn full_sync_plan(desired: &Ruleset, saved: &SavedTables) -> RestorePlan {
    let mut plan = RestorePlan::full(desired);
    for table in Table::ALL {
        let fresh = SavedTable::fresh(table);
        let have = saved.table(table).unwrap_or(&fresh);
        let want = desired.table(table);
        let tp = plan.table_mut(table);
        (tp.delete_jumps, tp.insert_jumps) = jump_fixes(table, &want.jumps, have);
        let foreign = foreign_references(table, have);
        for chain in have.chains.keys() {
            if table.is_builtin(chain) || !is_owned_chain(chain) || want.chains.contains_key(chain)
            {
                continue;
            }
            if foreign.contains(chain) {
                tp.flush.insert(chain.clone());
            } else {
                tp.delete.insert(chain.clone());
            }
        }
    }
    plan
}

/// The cleanup's transaction: every rule in a built-in chain that jumps to an owned chain, and
/// every owned chain (flushed only when someone else's rule refers to it).
pub fn cleanup_plan(saved: &SavedTables) -> RestorePlan {
    let mut plan = RestorePlan::default();
    for table in Table::ALL {
        let Some(have) = saved.table(table) else {
            continue;
        };
        let tp = plan.table_mut(table);
        (tp.delete_jumps, _) = jump_fixes(table, &[], have);
        let foreign = foreign_references(table, have);
        for chain in have.chains.keys() {
            if table.is_builtin(chain) || !is_owned_chain(chain) {
                continue;
            }
            if foreign.contains(chain) {
                tp.flush.insert(chain.clone());
            } else {
                tp.delete.insert(chain.clone());
            }
        }
    }
    plan
}

/// Every difference between what the kernel holds and `desired`, for owned chains and jumps.
pub fn drift(desired: &Ruleset, saved: &SavedTables) -> Vec<Drift> {
    let mut out = Vec::new();
    for table in Table::ALL {
        let fresh = SavedTable::fresh(table);
        let have = saved.table(table).unwrap_or(&fresh);
        let want = desired.table(table);
        for (chain, rules) in &want.chains {
            let expected: Vec<String> = rules.iter().map(|r| as_saved(r)).collect();
            match have.chains.get(chain) {
                None => out.push(Drift::MissingChain {
                    table,
                    chain: chain.clone(),
                }),
                Some(actual) if *actual != expected => out.push(Drift::ChainDiffers {
                    table,
                    chain: chain.clone(),
                    expected,
                    actual: actual.clone(),
                }),
                Some(_) => {}
            }
        }
        for chain in have.chains.keys() {
            if is_owned_chain(chain) && !table.is_builtin(chain) && !want.chains.contains_key(chain)
            {
                out.push(Drift::UnexpectedChain {
                    table,
                    chain: chain.clone(),
                });
            }
        }
        for jump in &want.jumps {
            let rule = as_saved(&jump.rule);
            let count = have
                .chains
                .get(&jump.chain)
                .map_or(0, |rules| rules.iter().filter(|r| **r == rule).count());
            if count != 1 {
                out.push(Drift::JumpCount {
                    table,
                    jump: jump.clone(),
                    count,
                });
            }
        }
        for chain in table.builtin_chains() {
            for rule in have.chains.get(*chain).into_iter().flatten() {
                let wanted = want
                    .jumps
                    .iter()
                    .any(|j| j.chain == *chain && as_saved(&j.rule) == *rule);
                if !wanted && rule_target(rule).is_some_and(|t| is_owned_chain(&t)) {
                    out.push(Drift::UnexpectedJump {
                        table,
                        jump: Jump::new(chain, rule.clone()),
                    });
                }
            }
        }
    }
    out
}

// === The driver ===

/// See the module documentation.
#[derive(Debug)]
pub struct IptablesDriver<B: IptablesBackend = SystemIptables> {
    backend: B,
    /// What the kernel holds, as of the last successful sync; `None` when unknown.
    applied: Option<Ruleset>,
    need_full_sync: bool,
    last_full_sync: Option<Instant>,
    full_sync_period: Duration,
}

impl Default for IptablesDriver<SystemIptables> {
    fn default() -> Self {
        Self::new()
    }
}

impl IptablesDriver<SystemIptables> {
    /// A driver using the system's iptables tools.
    pub fn new() -> Self {
        Self::with_backend(SystemIptables::new())
    }
}

impl<B: IptablesBackend> IptablesDriver<B> {
    /// kube-proxy's `FullSyncPeriod`: a full resync at least this often repairs what someone
    /// else changed behind the driver's back.
    pub const DEFAULT_FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

    pub fn with_backend(backend: B) -> Self {
        IptablesDriver {
            backend,
            applied: None,
            need_full_sync: true,
            last_full_sync: None,
            full_sync_period: Self::DEFAULT_FULL_SYNC_PERIOD,
        }
    }

    pub fn set_full_sync_period(&mut self, period: Duration) {
        self.full_sync_period = period;
    }

    /// Makes the next sync a full one (for example when a canary shows the tables were flushed).
    pub fn request_full_sync(&mut self) {
        self.need_full_sync = true;
    }

    /// The ruleset the kernel holds since the last successful sync, if known.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    fn read(&mut self) -> Result<SavedTables, IptablesError> {
        let text = self.backend.save()?;
        Ok(SavedTables::parse(&text)?)
    }

    fn restore(
        &mut self,
        plan: &RestorePlan,
        report: &mut SyncReport,
    ) -> Result<(), IptablesError> {
        let input = plan.render();
        report.count(plan);
        report.restore_bytes = input.len();
        report.processes += 1;
        let started = Instant::now();
        let result = self.backend.restore(&input);
        report.restore_duration += started.elapsed();
        result
    }

    /// Makes the kernel hold `desired`. See the module documentation for full and partial syncs.
    pub fn sync(&mut self, desired: &Ruleset) -> Result<SyncReport, IptablesError> {
        let started = Instant::now();
        let mut report = SyncReport::default();
        let full_due = self
            .last_full_sync
            .is_none_or(|at| at.elapsed() >= self.full_sync_period);
        if let (false, false, Some(applied)) =
            (self.need_full_sync, full_due, self.applied.as_ref())
        {
            let plan = RestorePlan::diff(desired, applied);
            if plan.is_empty() {
                report.duration = started.elapsed();
                return Ok(report);
            }
            match self.restore(&plan, &mut report) {
                Ok(()) => {
                    self.applied = Some(desired.clone());
                    report.duration = started.elapsed();
                    tracing::debug!(?report, "iptables partial sync");
                    return Ok(report);
                }
                Err(error) => {
                    tracing::warn!(%error, "iptables partial sync failed; resyncing fully");
                    report.fell_back = Some(error.to_string());
                }
            }
        }

        // Full sync. Until it succeeds the kernel's state is unknown.
        report.full = true;
        self.need_full_sync = true;
        self.applied = None;
        let save_started = Instant::now();
        report.processes += 1;
        let saved = self.read()?;
        report.save_duration = save_started.elapsed();
        let plan = full_sync_plan(desired, &saved);
        self.restore(&plan, &mut report)?;
        self.applied = Some(desired.clone());
        self.need_full_sync = false;
        self.last_full_sync = Some(Instant::now());
        report.duration = started.elapsed();
        tracing::info!(?report, "iptables full sync");
        Ok(report)
    }

    /// Compares the kernel with `desired` (one iptables-save). Empty means identical.
    pub fn verify(&mut self, desired: &Ruleset) -> Result<Vec<Drift>, IptablesError> {
        let saved = self.read()?;
        Ok(drift(desired, &saved))
    }

    /// Removes every owned chain and every built-in-chain rule jumping to one, in one
    /// transaction, then forgets what it had applied (the next sync is a full one).
    pub fn cleanup(&mut self) -> Result<CleanupReport, IptablesError> {
        let started = Instant::now();
        let saved = self.read()?;
        let plan = cleanup_plan(&saved);
        self.applied = None;
        self.need_full_sync = true;
        if !plan.is_empty() {
            self.backend.restore(&plan.render())?;
        }
        let report = CleanupReport {
            duration: started.elapsed(),
            chains_deleted: plan.chains_deleted(),
            jumps_deleted: plan.jumps_deleted(),
            chains_left: Table::ALL
                .iter()
                .flat_map(|t| plan.table(*t).flush.iter().map(|c| (*t, c.clone())))
                .collect(),
        };
        tracing::info!(?report, "iptables cleanup");
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
