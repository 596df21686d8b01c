//! margayctl's reusable parts: reading manifests (YAML/JSON documents and Lists), printing
//! resources (tables, YAML, JSON, names, kubectl JSONPath). `margay-lab get` prints with them too,
//! so both tools look the same.

pub mod input;
pub mod jsonpath;
pub mod output;
