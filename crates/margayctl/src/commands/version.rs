//! `version`, printed as calicoctl prints it.

use anyhow::Result;
use margay_api::Kind;
use margay_datastore::{Client, Key};

pub async fn run(client: &Client) -> Result<()> {
    margayctl::outln!("Client Version:    v{}", margay_api::VERSION);
    margayctl::outln!("Git commit:        {}", env!("MARGAY_GIT_COMMIT"));
    let info = client
        .get(&Key::new(Kind::ClusterInformation, None, "default"))
        .await
        .ok();
    let field = |name: &str| {
        info.as_ref()
            .and_then(|i| i.value["spec"][name].as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned())
    };
    margayctl::outln!("Cluster Version:   {}", field("calicoVersion"));
    margayctl::outln!("Cluster Type:      {}", field("clusterType"));
    margayctl::outln!("Datastore:         {}", client.store().describe());
    Ok(())
}
