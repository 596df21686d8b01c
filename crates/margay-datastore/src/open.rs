//! Opening a datastore from the URL users configure (`--datastore`, `MARGAY_DATASTORE`).
//!
//! A URL rather than a bare path so that the etcd backend can be added later without changing how
//! the setting is spelled: `sqlite:///var/lib/margay/margay.db` today, `etcd://host:2379` later.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{Datastore, Error};
use crate::sqlite::SqliteDatastore;

/// The store used when none is configured: the SQLite file every process on the node shares.
pub const DEFAULT_DATASTORE_URL: &str = "sqlite:///var/lib/margay/margay.db";

/// What a datastore URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Sqlite(PathBuf),
}

/// Opens the datastore named by `url`.
///
/// Accepted forms: `sqlite:///absolute/path.db` and `sqlite://relative/path.db` (relative to the
/// working directory). `etcd://` URLs are recognised but not supported yet.
pub async fn open(url: &str) -> Result<Arc<dyn Datastore>, Error> {
    match parse(url)? {
        Target::Sqlite(path) => {
            let store = tokio::task::spawn_blocking(move || SqliteDatastore::open(&path))
                .await
                .map_err(|e| Error::Unavailable(format!("opening the datastore failed: {e}")))??;
            Ok(Arc::new(store))
        }
    }
}

fn parse(url: &str) -> Result<Target, Error> {
    if url.trim().is_empty() {
        return Err(Error::Invalid(format!(
            "the datastore URL is empty; use for example {DEFAULT_DATASTORE_URL}"
        )));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.starts_with('/') {
            return Err(Error::Invalid(format!(
                "the datastore URL {url:?} is a path, not a URL; write sqlite://{url}"
            )));
        }
        if let Some(path) = url.strip_prefix("sqlite:") {
            return Err(Error::Invalid(format!(
                "the datastore URL {url:?} is missing the // after sqlite:; write \
                 sqlite://{path} (an absolute path gives three slashes: sqlite:///var/lib/margay/margay.db)"
            )));
        }
        return Err(Error::Invalid(format!(
            "the datastore URL {url:?} has no scheme; use sqlite:///absolute/path.db \
             (for example {DEFAULT_DATASTORE_URL})"
        )));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => {
            if rest.is_empty() {
                return Err(Error::Invalid(format!(
                    "the datastore URL {url:?} names no file; use sqlite:///absolute/path.db \
                     (for example {DEFAULT_DATASTORE_URL})"
                )));
            }
            if rest.ends_with('/') {
                return Err(Error::Invalid(format!(
                    "the datastore URL {url:?} names a directory; name the database file, \
                     for example sqlite://{rest}margay.db"
                )));
            }
            Ok(Target::Sqlite(PathBuf::from(rest)))
        }
        "etcd" | "etcd+http" | "etcd+https" | "etcdv3" => Err(Error::Invalid(format!(
            "the etcd datastore is not built yet (asked for {url:?}); use the SQLite datastore, \
             for example {DEFAULT_DATASTORE_URL}"
        ))),
        _ => Err(Error::Invalid(format!(
            "unsupported datastore URL scheme {scheme:?} in {url:?}; supported: \
             sqlite:///absolute/path.db (for example {DEFAULT_DATASTORE_URL})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(url: &str) -> String {
        match parse(url) {
            Err(Error::Invalid(msg)) => msg,
            other => panic!("{url:?}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn sqlite_urls_name_files() {
        assert_eq!(
            parse(DEFAULT_DATASTORE_URL),
            Ok(Target::Sqlite(PathBuf::from("/var/lib/margay/margay.db")))
        );
        assert_eq!(
            parse("sqlite://data/margay.db"),
            Ok(Target::Sqlite(PathBuf::from("data/margay.db")))
        );
        assert_eq!(
            parse("SQLite:///tmp/x.db"),
            Ok(Target::Sqlite(PathBuf::from("/tmp/x.db")))
        );
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        assert!(
            invalid("/var/lib/margay/margay.db").contains("sqlite:///var/lib/margay/margay.db")
        );
        assert!(invalid("sqlite:/tmp/x.db").contains("sqlite:///tmp/x.db"));
        assert!(invalid("margay.db").contains("no scheme"));
        assert!(invalid("").contains("empty"));
        assert!(invalid("sqlite://").contains("names no file"));
        assert!(invalid("sqlite:///var/lib/margay/").contains("directory"));
        assert!(invalid("etcd://127.0.0.1:2379").contains("etcd datastore is not built yet"));
        assert!(invalid("postgres://db/margay").contains("unsupported"));
    }
}
