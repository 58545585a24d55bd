//! A Lifeboat cluster of node processes on this machine for the load
//! generators, with tenant `bench` and volume `bench/v` in PG `bench/main`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lifeboat_chaos_tests::harness::TestNode;

pub struct Cluster {
    pub nodes: Vec<TestNode>,
}

impl Cluster {
    /// One node process per entry of `sites` (the first three at the
    /// active site are the PG's voters, the others learners), joined over
    /// mutual TLS, with a volume of `size_mib`. Returns once the PG's
    /// leader replicates to every other member.
    ///
    /// `BENCH_EXTRA_CONFIG`, if set, is appended to every node's config
    /// file (TOML), for experiments with settings (see BENCHMARKS.md).
    pub fn start(dir: &Path, sites: &[&str], size_mib: u64) -> Result<Cluster> {
        let mut nodes = lifeboat_chaos_tests::harness::start_nodes(
            &dir.join("cluster"),
            sites,
            &format!(
                "[store]\nreserve_bytes = 67108864\n{}",
                std::env::var("BENCH_EXTRA_CONFIG").unwrap_or_default()
            ),
        )?;
        lifeboat_chaos_tests::harness::form_cluster(&mut nodes);
        nodes[0].must_cli(&["tenant", "create", "bench"]);
        nodes[0].must_cli(&[
            "volume",
            "create",
            "bench/v",
            "--size",
            &format!("{size_mib}MiB"),
        ]);
        let cluster = Cluster { nodes };
        let others = sites.len() - 1;
        let started = Instant::now();
        loop {
            let status = cluster.leader_status().unwrap_or_default();
            if status["lag"].as_array().is_some_and(|l| l.len() == others) {
                return Ok(cluster);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("bench/main never had {} members: {status}", sites.len());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `bench/main` as its leader reports it.
    pub fn leader_status(&self) -> Option<serde_json::Value> {
        let out = self.nodes[0].cli(&["status", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let main = v["pgs"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "bench/main")?;
        let leader = main["leader_node"].as_u64()?;
        let n = self.nodes.iter().find(|n| n.node_id == leader)?;
        let out = n.cli(&["status", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["pgs"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "bench/main")
            .cloned()
    }

    /// The node that leads `bench/main`.
    pub fn leader(&self) -> Result<&TestNode> {
        let status = self.leader_status().context("no status of bench/main")?;
        let id = status["leader_node"].as_u64().context("no leader")?;
        self.nodes
            .iter()
            .find(|n| n.node_id == id)
            .context("leader is not one of ours")
    }

    pub fn stop(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            n.stop()?;
        }
        Ok(())
    }
}
