//! The name a workload answers with: `--name`/`$POD_NAME` if given, else the host name.
//!
//! The host name is read from /proc/sys/kernel/hostname, which shows the reader's UTS namespace
//! (no unsafe `gethostname` call needed). A lab pod that is only a network namespace shares the
//! node's UTS namespace, so the lab passes POD_NAME to tell its pods apart.

pub fn workload_name(explicit: Option<String>) -> String {
    explicit
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_name_wins_and_host_name_is_the_fallback() {
        assert_eq!(workload_name(Some("customer-1".to_owned())), "customer-1");
        let fallback = workload_name(None);
        assert!(!fallback.is_empty());
        assert!(!fallback.contains(char::is_whitespace));
        assert_eq!(workload_name(Some(String::new())), fallback);
    }
}
