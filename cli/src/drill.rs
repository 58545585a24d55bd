//! `lifeboat drill`: start, list, report on and stop failover drills.
//!
//! Start, report and stop run on a node of the drill's site (it reads its
//! own replicas of the source PGs): the CLI asks the node it was pointed
//! at for the cluster's nodes and talks to the first data node of that
//! site that answers.

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use lifeboat_proto::admin as api;
use lifeboat_proto::raft as pb;

use crate::output::{Output, Table};
use crate::{Client, Exit, format_time_ms};

#[derive(Subcommand)]
pub(crate) enum DrillCommand {
    /// Rehearse a failover to SITE while production runs: pins a restore
    /// point in each protection group and exports a writable clone of
    /// every volume there as TENANT/drill-ID-VOLUME, read through to the
    /// site's own replica (nothing is copied; replication keeps running).
    Start {
        /// The standby site to rehearse at.
        #[arg(long)]
        site: String,
        /// TENANT/PG (repeat for several; default: every PG with a
        /// replica at the site).
        #[arg(long = "pg")]
        pgs: Vec<String>,
        /// `latest` (what the site has applied) or a time: RFC 3339 or
        /// relative (-15m).
        #[arg(long, default_value = "latest", allow_hyphen_values = true)]
        at: String,
    },
    /// Every drill, running and past.
    List,
    /// What a drill measured: RPO at start, time to first I/O on each
    /// clone (RTO), checksums of each clone against its source at the
    /// restore point, and the replication lag while it ran.
    Report {
        id: u64,
        #[arg(long, value_enum, default_value_t = ReportFormat::Md)]
        format: ReportFormat,
        /// Leave out the checksums (they read every clone and its source).
        #[arg(long)]
        no_checksums: bool,
    },
    /// End a drill: its clones and protection groups are removed and the
    /// restore points unpinned; its record stays for `drill report`.
    Stop { id: u64 },
    /// Create a token that runs drills and nothing else (shown once).
    Token,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum ReportFormat {
    Json,
    Md,
    Html,
}

pub(crate) async fn run(client: &mut Client, command: DrillCommand, out: &Output) -> Result<()> {
    match command {
        DrillCommand::Start { site, pgs, at } => {
            let mut at_site = client_at_site(client, &site).await?;
            let req = at_site.request(api::StartDrillRequest { site, pgs, at });
            let d = at_site.api().start_drill(req).await?.into_inner();
            print_drills(out, &[d]);
        }
        DrillCommand::List => {
            let req = client.request(api::ListDrillsRequest {});
            let r = client.api().list_drills(req).await?.into_inner();
            print_drills(out, &r.drills);
        }
        DrillCommand::Report {
            id,
            format,
            no_checksums,
        } => {
            let req = client.request(api::DrillReportRequest {
                id,
                checksums: false,
            });
            let mut r = client.api().drill_report(req).await?.into_inner();
            let drill = r.drill.clone().context("the node sent no drill")?;
            if !no_checksums && drill.state != pb::DrillState::DrillStopped as i32 {
                let mut at_site = client_at_site(client, &drill.site).await?;
                let req = at_site.request(api::DrillReportRequest {
                    id,
                    checksums: true,
                });
                r = at_site.api().drill_report(req).await?.into_inner();
            }
            let report = Report::new(&r)?;
            match format {
                ReportFormat::Json => out.json_value(&report.json()),
                ReportFormat::Md => out!("{}", report.markdown()),
                ReportFormat::Html => out!("{}", report.html()),
            }
        }
        DrillCommand::Stop { id } => {
            let req = client.request(api::DrillReportRequest {
                id,
                checksums: false,
            });
            let r = client.api().drill_report(req).await?.into_inner();
            let site = r.drill.map(|d| d.site).unwrap_or_default();
            let mut at_site = client_at_site(client, &site).await?;
            let req = at_site.request(api::StopDrillRequest { id });
            let d = at_site.api().stop_drill(req).await?.into_inner();
            print_drills(out, &[d]);
        }
        DrillCommand::Token => {
            let req = client.request(api::CreateTenantTokenRequest {
                tenant: String::new(),
                drill: true,
            });
            let r = client.api().create_tenant_token(req).await?.into_inner();
            if out.json {
                out.json_value(&serde_json::json!({
                    "token": r.token,
                    "id": r.info.as_ref().map(|i| i.id.clone()),
                }));
            } else {
                outln!("drill token (shown once, keep it): {}", r.token);
                if let Some(i) = r.info {
                    outln!(
                        "id: {} (revoke with `lifeboat tenant token revoke {}`)",
                        i.id,
                        i.id
                    );
                }
            }
        }
    }
    Ok(())
}

/// A client of a data node at `site` that answers: the node `client`
/// talks to if it is one, else the first other.
async fn client_at_site(client: &mut Client, site: &str) -> Result<Client> {
    let req = client.request(api::StatusRequest {});
    let here = client.api().status(req).await?.into_inner();
    let req = client.request(api::ListNodesRequest {});
    let nodes = client.api().list_nodes(req).await?.into_inner().nodes;
    let mut candidates: Vec<&api::Node> = nodes
        .iter()
        .filter(|n| n.site == site && !n.removed && n.role != "witness")
        .collect();
    if candidates.is_empty() {
        return Err(anyhow::Error::new(Exit(3)).context(format!("site {site} has no data node")));
    }
    // The node already talked to first, then those it reaches.
    candidates.sort_by_key(|n| (n.id != here.node_id, !n.reachable, n.id));
    let mut errors = Vec::new();
    for n in candidates {
        let endpoint = if n.admin_addr.contains("://") {
            n.admin_addr.clone()
        } else {
            format!("http://{}", n.admin_addr)
        };
        match Client::connect(&endpoint, client.token().clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(format!("node {}: {e:#}", n.id)),
        }
    }
    Err(anyhow::Error::new(Exit(6)).context(format!(
        "no node of site {site} answered: {}",
        errors.join("; ")
    )))
}

fn state_name(d: &pb::DrillRecord) -> &'static str {
    match pb::DrillState::try_from(d.state) {
        Ok(pb::DrillState::DrillStarting) => "starting",
        Ok(pb::DrillState::DrillRunning) => "running",
        Ok(pb::DrillState::DrillStopped) => "stopped",
        Err(_) => "unknown",
    }
}

fn print_drills(out: &Output, drills: &[pb::DrillRecord]) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            drills.iter().map(drill_json).collect(),
        ));
        return;
    }
    let mut table = Table::new(&[
        "ID", "SITE", "STATE", "AT", "STARTED", "READY IN", "PG", "RPO", "CLONES",
    ]);
    for d in drills {
        let ready = if d.ready_ms > 0 {
            format!("{} ms", d.ready_ms.saturating_sub(d.started_ms))
        } else {
            "-".into()
        };
        let head = [
            d.id.to_string(),
            d.site.clone(),
            state_name(d).into(),
            d.at.clone(),
            format_time_ms(d.started_ms),
            ready,
        ];
        if d.pgs.is_empty() {
            table.row(
                head.iter()
                    .cloned()
                    .chain(["-".into(), "-".into(), "-".into()])
                    .collect(),
            );
        }
        for p in &d.pgs {
            let pg = [
                format!("{}/{}", p.tenant, p.source_name),
                format!(
                    "{} entries, {} ms",
                    rpo_entries(p),
                    p.source_ms.saturating_sub(p.index_ms)
                ),
                clones_of(p).map(|c| c.name).collect::<Vec<_>>().join(", "),
            ];
            table.row(head.iter().cloned().chain(pg).collect());
        }
    }
    table.print();
}

/// One clone of a drill PG, a volume's or a bucket's, as reports show it.
struct CloneView {
    kind: &'static str,
    /// `TENANT/NAME` for a volume, the bucket's name for a bucket.
    name: String,
    source: String,
    /// The name the report's checksums carry.
    checksum_name: String,
    size_bytes: Option<u64>,
    usable_ms: u64,
    first_io_ms: u64,
}

fn clones_of(p: &pb::DrillPg) -> impl Iterator<Item = CloneView> + '_ {
    let volumes = p.volumes.iter().map(|v| CloneView {
        kind: "volume",
        name: format!("{}/{}", p.tenant, v.name),
        source: format!("{}/{}", p.tenant, v.source),
        checksum_name: v.name.clone(),
        size_bytes: Some(v.size_bytes),
        usable_ms: v.usable_ms,
        first_io_ms: v.first_io_ms,
    });
    let buckets = p.buckets.iter().map(|b| CloneView {
        kind: "bucket",
        name: b.name.clone(),
        source: b.source.clone(),
        checksum_name: b.name.clone(),
        size_bytes: None,
        usable_ms: b.usable_ms,
        first_io_ms: b.first_io_ms,
    });
    volumes.chain(buckets)
}

/// Committed entries the restore point lacks against the source's log
/// when the pin was written (the pin's own entry not counted).
fn rpo_entries(p: &pb::DrillPg) -> u64 {
    p.source_index.saturating_sub(p.index + 1)
}

fn drill_json(d: &pb::DrillRecord) -> serde_json::Value {
    serde_json::json!({
        "id": d.id, "site": d.site, "state": state_name(d), "at": d.at,
        "started_ms": d.started_ms, "started": format_time_ms(d.started_ms),
        "ready_ms": d.ready_ms,
        "ready_after_ms": (d.ready_ms > 0).then(|| d.ready_ms.saturating_sub(d.started_ms)),
        "stopped_ms": d.stopped_ms,
        "pgs": d.pgs.iter().map(|p| serde_json::json!({
            "source": format!("{}/{}", p.tenant, p.source_name),
            "drill_pg": format!("{}/{}", p.tenant, p.drill_pg_name),
            "pin": p.pin,
            "index": p.index, "index_ms": p.index_ms,
            "source_index": p.source_index, "source_ms": p.source_ms,
            "rpo_entries": rpo_entries(p),
            "rpo_ms": p.source_ms.saturating_sub(p.index_ms),
            "lag_max_seconds": p.lag_max_seconds,
            "lag_mean_seconds": mean_lag(p),
            "lag_max_entries": p.lag_max_entries,
            "lag_samples": p.lag_samples,
            "clones": clones_of(p).map(|c| serde_json::json!({
                "kind": c.kind,
                "name": c.name,
                "source": c.source,
                "size_bytes": c.size_bytes,
                "usable_after_ms": (c.usable_ms > 0).then(|| c.usable_ms.saturating_sub(d.started_ms)),
                "first_io_after_ms": (c.first_io_ms > 0).then(|| c.first_io_ms.saturating_sub(d.started_ms)),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn mean_lag(p: &pb::DrillPg) -> Option<f64> {
    (p.lag_samples > 0).then(|| p.lag_sum_seconds / p.lag_samples as f64)
}

/// One table of a report: its heading, column names and rows.
type ReportTable = (String, Vec<&'static str>, Vec<Vec<String>>);

/// A drill's report, as JSON, Markdown or HTML.
struct Report {
    drill: pb::DrillRecord,
    checksums: Vec<api::CloneChecksum>,
    node_id: u64,
}

impl Report {
    fn new(r: &api::DrillReportResponse) -> Result<Report> {
        Ok(Report {
            drill: r.drill.clone().context("the node sent no drill")?,
            checksums: r.checksums.clone(),
            node_id: r.node_id,
        })
    }

    fn checksum_of(&self, tenant: &str, c: &CloneView) -> Option<&api::CloneChecksum> {
        self.checksums.iter().find(|s| {
            s.tenant == tenant && s.name == c.checksum_name && s.bucket == (c.kind == "bucket")
        })
    }

    fn json(&self) -> serde_json::Value {
        let mut v = drill_json(&self.drill);
        v["checksums_read_on_node"] =
            serde_json::json!((!self.checksums.is_empty()).then_some(self.node_id));
        v["checksums"] = serde_json::Value::Array(
            self.checksums
                .iter()
                .map(|c| {
                    let mut v = serde_json::json!({
                        "index": c.index,
                        "clone_sha256": c.clone_sha256,
                        "source_sha256": c.source_sha256,
                        "match": c.clone_sha256 == c.source_sha256,
                    });
                    if c.bucket {
                        v["kind"] = "bucket".into();
                        v["clone"] = c.name.clone().into();
                        v["source"] = c.source.clone().into();
                        v["objects_written_by_drill"] = c.objects_written.into();
                    } else {
                        v["kind"] = "volume".into();
                        v["clone"] = format!("{}/{}", c.tenant, c.name).into();
                        v["source"] = format!("{}/{}", c.tenant, c.source).into();
                        v["blocks_written_by_drill"] = c.blocks_written.into();
                    }
                    v
                })
                .collect(),
        );
        v
    }

    /// The report's tables, shared by Markdown and HTML.
    fn tables(&self) -> Vec<ReportTable> {
        let d = &self.drill;
        let after = |ms: u64| {
            if ms == 0 {
                "-".to_owned()
            } else {
                format!("{} ms", ms.saturating_sub(d.started_ms))
            }
        };
        let summary = vec![
            vec!["site".into(), d.site.clone()],
            vec!["state".into(), state_name(d).into()],
            vec!["restore point asked".into(), d.at.clone()],
            vec!["started".into(), format_time_ms(d.started_ms)],
            vec!["every clone usable after".into(), after(d.ready_ms)],
            vec![
                "stopped".into(),
                if d.stopped_ms > 0 {
                    format_time_ms(d.stopped_ms)
                } else {
                    "-".into()
                },
            ],
        ];
        let pgs = d
            .pgs
            .iter()
            .map(|p| {
                vec![
                    format!("{}/{}", p.tenant, p.source_name),
                    format!("{} ({})", p.index, format_time_ms(p.index_ms)),
                    format!(
                        "{} entries, {} ms",
                        rpo_entries(p),
                        p.source_ms.saturating_sub(p.index_ms)
                    ),
                    format!("{:.3} s", p.lag_max_seconds),
                    mean_lag(p).map_or("-".into(), |m| format!("{m:.3} s")),
                    p.lag_max_entries.to_string(),
                    p.lag_samples.to_string(),
                ]
            })
            .collect();
        let clones = d
            .pgs
            .iter()
            .flat_map(|p| clones_of(p).map(move |v| (p, v)))
            .map(|(p, v)| {
                let c = self.checksum_of(&p.tenant, &v);
                vec![
                    format!("{} {}", v.kind, v.name),
                    v.source.clone(),
                    after(v.usable_ms),
                    after(v.first_io_ms),
                    c.map_or("-".into(), |c| c.clone_sha256.clone()),
                    c.map_or("-".into(), |c| c.source_sha256.clone()),
                    c.map_or("-".into(), |c| {
                        let written = if c.bucket {
                            (c.objects_written, "object")
                        } else {
                            (c.blocks_written, "block")
                        };
                        match (c.clone_sha256 == c.source_sha256, written) {
                            (true, _) => "yes".into(),
                            (false, (0, _)) => "NO".into(),
                            (false, (n, what)) => format!("no: the drill wrote {n} {what}(s)"),
                        }
                    }),
                ]
            })
            .collect();
        vec![
            (format!("Drill {}", d.id), vec!["", ""], summary),
            (
                "Restore points (RPO at start) and replication lag during the drill".into(),
                vec![
                    "source PG",
                    "restore point (index, time)",
                    "RPO at start",
                    "lag max",
                    "lag mean",
                    "lag max entries",
                    "samples",
                ],
                pgs,
            ),
            (
                if self.checksums.is_empty() {
                    "Clones (time to first I/O is the RTO)".into()
                } else {
                    format!(
                        "Clones (time to first I/O is the RTO; checksums read on node {})",
                        self.node_id
                    )
                },
                vec![
                    "clone",
                    "source",
                    "usable after",
                    "first I/O after",
                    "clone SHA-256",
                    "source SHA-256 at the restore point",
                    "match",
                ],
                clones,
            ),
        ]
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        for (i, (heading, header, rows)) in self.tables().into_iter().enumerate() {
            s.push_str(&format!(
                "{} {heading}\n\n",
                if i == 0 { "#" } else { "##" }
            ));
            s.push_str(&format!("| {} |\n", header.join(" | ")));
            s.push_str(&format!("|{}\n", " --- |".repeat(header.len())));
            for r in rows {
                let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
                s.push_str(&format!("| {} |\n", cells.join(" | ")));
            }
            s.push('\n');
        }
        s
    }

    fn html(&self) -> String {
        let mut s = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Lifeboat drill {}</title></head><body>\n",
            self.drill.id
        );
        for (i, (heading, header, rows)) in self.tables().into_iter().enumerate() {
            let h = if i == 0 { "h1" } else { "h2" };
            s.push_str(&format!(
                "<{h}>{}</{h}>\n<table border=\"1\">\n<tr>",
                escape(&heading)
            ));
            for c in header {
                s.push_str(&format!("<th>{}</th>", escape(c)));
            }
            s.push_str("</tr>\n");
            for r in rows {
                s.push_str("<tr>");
                for c in r {
                    s.push_str(&format!("<td>{}</td>", escape(&c)));
                }
                s.push_str("</tr>\n");
            }
            s.push_str("</table>\n");
        }
        s.push_str("</body></html>\n");
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            drill: pb::DrillRecord {
                id: 7,
                site: "dr".into(),
                at: "latest".into(),
                state: pb::DrillState::DrillRunning as i32,
                started_ms: 1_000,
                ready_ms: 1_250,
                pgs: vec![pb::DrillPg {
                    source_pg: 2,
                    tenant: "demo".into(),
                    source_name: "main".into(),
                    drill_pg: 9,
                    drill_pg_name: "drill-7-main".into(),
                    pin: "drill-7".into(),
                    index: 40,
                    index_ms: 900,
                    source_index: 44,
                    source_ms: 990,
                    volumes: vec![pb::DrillVolume {
                        source: "disk<0>".into(),
                        name: "drill-7-disk0".into(),
                        usable_ms: 1_200,
                        first_io_ms: 1_400,
                        ..Default::default()
                    }],
                    buckets: vec![pb::DrillBucket {
                        source: "backups".into(),
                        name: "backups-drill-7".into(),
                        usable_ms: 1_230,
                        first_io_ms: 1_600,
                        ..Default::default()
                    }],
                    lag_max_seconds: 0.5,
                    lag_samples: 2,
                    lag_sum_seconds: 0.6,
                    ..Default::default()
                }],
                ..Default::default()
            },
            checksums: vec![
                api::CloneChecksum {
                    tenant: "demo".into(),
                    name: "drill-7-disk0".into(),
                    clone_sha256: "aa".into(),
                    source_sha256: "bb".into(),
                    blocks_written: 3,
                    ..Default::default()
                },
                api::CloneChecksum {
                    tenant: "demo".into(),
                    name: "backups-drill-7".into(),
                    clone_sha256: "cc".into(),
                    source_sha256: "cc".into(),
                    bucket: true,
                    ..Default::default()
                },
            ],
            node_id: 4,
        }
    }

    #[test]
    fn the_report_says_rpo_rto_lag_and_checksums_in_every_format() {
        let r = report();
        let j = r.json();
        let pg = &j["pgs"][0];
        assert_eq!(pg["rpo_entries"], 3, "entries 41..=43; 44 is the pin");
        assert_eq!(pg["rpo_ms"], 90);
        assert_eq!(pg["lag_mean_seconds"], 0.3);
        assert_eq!(pg["clones"][0]["first_io_after_ms"], 400);
        assert_eq!(pg["clones"][0]["usable_after_ms"], 200);
        assert_eq!(j["ready_after_ms"], 250);
        assert_eq!(j["checksums"][0]["match"], false);
        assert_eq!(j["checksums_read_on_node"], 4);
        let bucket = &pg["clones"][1];
        assert_eq!(bucket["kind"], "bucket");
        assert_eq!(bucket["name"], "backups-drill-7");
        assert_eq!(bucket["first_io_after_ms"], 600);
        assert_eq!(j["checksums"][1]["clone"], "backups-drill-7");
        assert_eq!(j["checksums"][1]["match"], true);
        let md = r.markdown();
        assert!(md.starts_with("# Drill 7\n"), "{md}");
        assert!(md.contains("| demo/main | 40 ("), "{md}");
        assert!(md.contains("3 entries, 90 ms"), "{md}");
        assert!(md.contains("| 400 ms |"), "{md}");
        assert!(md.contains("no: the drill wrote 3 block(s)"), "{md}");
        assert!(
            md.contains("| bucket backups-drill-7 | backups | 230 ms | 600 ms | cc | cc | yes |"),
            "{md}"
        );
        let html = r.html();
        assert!(html.contains("<h1>Drill 7</h1>"), "{html}");
        assert!(html.contains("demo/disk&lt;0&gt;"), "escaped: {html}");
        assert!(!html.contains("disk<0>"), "{html}");
    }
}
