//! `projectcalico.org/v3` ClusterInformation: one object, `default`, describing the cluster.

use serde::{Deserialize, Serialize};

use crate::error::{Validation, fail};
use crate::object::Object;

pub type ClusterInformation = Object<ClusterInformationSpec>;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInformationSpec {
    #[serde(
        rename = "clusterGUID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_guid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calico_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore_ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

pub fn validate_name(name: &str) -> Validation {
    if name != "default" {
        return fail(
            "metadata.name",
            format!("{name:?}: ClusterInformation has one object, named default"),
        );
    }
    Ok(())
}
