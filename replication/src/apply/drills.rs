//! Applying the catalog's drill commands (DESIGN.md "Drills"): the record
//! a drill's start writes step by step, what nodes observe while it runs
//! (first I/O on each clone, the source's lag to the drill's site), and
//! its stop, which takes its PGs and their volume and bucket names out of
//! the catalog and keeps the record as the drill's history.

use std::io;

use lifeboat_proto::raft as pb;

use super::{ApplyContext, Outcome};
use crate::catalog::{self, Counter};
use crate::types::{Applied, Rejection};

impl ApplyContext<'_> {
    fn drill_record(&self, id: u64) -> io::Result<Result<pb::DrillRecord, Rejection>> {
        Ok(self
            .catalog_get::<pb::DrillRecord>(&catalog::drill_key(id))?
            .ok_or(Rejection::DrillNotFound { drill: id }))
    }

    pub(super) fn apply_put_drill(
        &mut self,
        p: &pb::PutDrill,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let Some(mut record) = p.record.clone() else {
            return Ok(Err(Rejection::Malformed {
                reason: "a drill without its record".into(),
            }));
        };
        if record.state == pb::DrillState::DrillStopped as i32 {
            return Ok(Err(Rejection::Malformed {
                reason: "a drill is stopped by StopDrill".into(),
            }));
        }
        if record.id == 0 {
            record.id = self.next_id(Counter::Drill)?;
            if record.started_ms == 0 {
                record.started_ms = stamp_ms;
            }
        } else {
            let old = match self.drill_record(record.id)? {
                Ok(old) => old,
                Err(rejection) => return Ok(Err(rejection)),
            };
            if old.state == pb::DrillState::DrillStopped as i32 {
                return Ok(Err(Rejection::DrillStopped { drill: old.id }));
            }
            keep_observations(&old, &mut record);
        }
        self.catalog_put(catalog::drill_key(record.id), &record);
        Ok(Ok(Applied::DrillPut { drill: record.id }))
    }

    pub(super) fn apply_record_drill_io(&mut self, d: &pb::RecordDrillIo) -> io::Result<Outcome> {
        let mut record = match self.drill_record(d.drill)? {
            Ok(r) => r,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let first_io = if d.bucket {
            record
                .pgs
                .iter_mut()
                .flat_map(|p| p.buckets.iter_mut())
                .find(|b| b.name == d.volume)
                .map(|b| &mut b.first_io_ms)
        } else {
            record
                .pgs
                .iter_mut()
                .flat_map(|p| p.volumes.iter_mut())
                .find(|v| v.name == d.volume)
                .map(|v| &mut v.first_io_ms)
        };
        let Some(first_io) = first_io else {
            return Ok(Err(Rejection::Malformed {
                reason: format!("drill {} has no clone {}", d.drill, d.volume),
            }));
        };
        // The first one counts; a later report (another node, a retry)
        // changes nothing.
        if *first_io == 0 {
            *first_io = d.at_ms;
            self.catalog_put(catalog::drill_key(record.id), &record);
        }
        Ok(Ok(Applied::Done))
    }

    pub(super) fn apply_record_drill_lag(&mut self, d: &pb::RecordDrillLag) -> io::Result<Outcome> {
        let mut record = match self.drill_record(d.drill)? {
            Ok(r) => r,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if record.state == pb::DrillState::DrillStopped as i32 {
            return Ok(Err(Rejection::DrillStopped { drill: d.drill }));
        }
        let Some(pg) = record.pgs.iter_mut().find(|p| p.source_pg == d.source_pg) else {
            return Ok(Err(Rejection::Malformed {
                reason: format!("drill {} has no source PG {}", d.drill, d.source_pg),
            }));
        };
        if !d.lag_seconds.is_finite() || d.lag_seconds < 0.0 {
            return Ok(Err(Rejection::Malformed {
                reason: format!("a lag of {} seconds", d.lag_seconds),
            }));
        }
        pg.lag_max_seconds = pg.lag_max_seconds.max(d.lag_seconds);
        pg.lag_max_entries = pg.lag_max_entries.max(d.lag_entries);
        pg.lag_samples += 1;
        pg.lag_sum_seconds += d.lag_seconds;
        self.catalog_put(catalog::drill_key(record.id), &record);
        Ok(Ok(Applied::Done))
    }

    /// Takes the drill's PGs and their volume and bucket names out of the
    /// catalog
    /// (each node then drops its replica of them: the stopped record says
    /// which PGs were the drill's) and keeps the record, stopped. Stopping
    /// a stopped drill is done already.
    pub(super) fn apply_stop_drill(
        &mut self,
        d: &pb::StopDrill,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let mut record = match self.drill_record(d.drill)? {
            Ok(r) => r,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if record.state == pb::DrillState::DrillStopped as i32 {
            return Ok(Ok(Applied::Done));
        }
        // Everything checked before anything is staged: a refused stop
        // changes nothing.
        let mut pgs = Vec::new();
        for p in record.pgs.iter().filter(|p| p.drill_pg != 0) {
            let Some(pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(p.drill_pg))?
            else {
                continue;
            };
            if pg.drill != record.id {
                return Ok(Err(Rejection::Malformed {
                    reason: format!(
                        "protection group {} is not drill {}'s (its drill: {})",
                        pg.id, record.id, pg.drill
                    ),
                }));
            }
            pgs.push(pg);
        }
        for p in record.pgs.iter().filter(|p| p.drill_pg != 0) {
            for v in &p.volumes {
                let key = catalog::volume_name_key(&p.tenant, &v.name);
                if self
                    .catalog_get::<pb::VolumeNameRecord>(&key)?
                    .is_some_and(|n| n.pg == p.drill_pg)
                {
                    self.catalog_delete(key);
                }
            }
            for b in &p.buckets {
                let key = catalog::bucket_name_key(&b.name);
                if self
                    .catalog_get::<pb::BucketNameRecord>(&key)?
                    .is_some_and(|n| n.pg == p.drill_pg)
                {
                    self.catalog_delete(key);
                }
            }
        }
        for pg in pgs {
            self.catalog_delete(catalog::pg_key(&pg.tenant, &pg.name));
            self.catalog_delete(catalog::pg_id_key(pg.id));
        }
        record.state = pb::DrillState::DrillStopped as i32;
        record.stopped_ms = stamp_ms;
        self.catalog_put(catalog::drill_key(record.id), &record);
        Ok(Ok(Applied::Done))
    }
}

/// What nodes observed while a drill ran, which the starter's next write
/// of its record does not know: first I/O on each clone, lag samples.
fn keep_observations(old: &pb::DrillRecord, new: &mut pb::DrillRecord) {
    for pg in &mut new.pgs {
        let Some(was) = old.pgs.iter().find(|p| p.source_pg == pg.source_pg) else {
            continue;
        };
        pg.lag_max_seconds = pg.lag_max_seconds.max(was.lag_max_seconds);
        pg.lag_max_entries = pg.lag_max_entries.max(was.lag_max_entries);
        pg.lag_samples = pg.lag_samples.max(was.lag_samples);
        pg.lag_sum_seconds = pg.lag_sum_seconds.max(was.lag_sum_seconds);
        for v in &mut pg.volumes {
            if v.first_io_ms == 0
                && let Some(w) = was.volumes.iter().find(|w| w.name == v.name)
            {
                v.first_io_ms = w.first_io_ms;
            }
        }
        for b in &mut pg.buckets {
            if b.first_io_ms == 0
                && let Some(w) = was.buckets.iter().find(|w| w.name == b.name)
            {
                b.first_io_ms = w.first_io_ms;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lifeboat_store::db::{Db, DbOptions};
    use lifeboat_store::{LogIndex, PgId};

    use super::*;

    fn cmd(stamp_ms: u64, kind: pb::command::Kind) -> pb::Command {
        pb::Command {
            stamp_ms,
            kind: Some(kind),
        }
    }

    fn put(record: pb::DrillRecord) -> pb::Command {
        cmd(
            5,
            pb::command::Kind::PutDrill(pb::PutDrill {
                record: Some(record),
            }),
        )
    }

    fn drill(cx: &ApplyContext, id: u64) -> pb::DrillRecord {
        cx.catalog_get(&catalog::drill_key(id)).unwrap().unwrap()
    }

    /// A drill's record is written as its start goes on (the first write
    /// allocates its id), keeps what nodes observed meanwhile, and its
    /// stop takes its PG and names out of the catalog and keeps the record;
    /// a stopped drill takes nothing more.
    #[test]
    fn a_drill_is_recorded_observed_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        let start = pb::DrillRecord {
            site: "dr".into(),
            at: "latest".into(),
            ..Default::default()
        };
        assert_eq!(
            cx.apply_command(LogIndex(1), &put(start.clone())).unwrap(),
            Ok(Applied::DrillPut { drill: 1 })
        );
        assert_eq!(
            cx.apply_command(LogIndex(2), &put(start.clone())).unwrap(),
            Ok(Applied::DrillPut { drill: 2 }),
            "each new drill its own id"
        );
        assert_eq!(drill(&cx, 1).started_ms, 5, "the entry's stamp");

        // Its PG, with a clone's name bound to it, and another PG's name.
        let drill_pg = pb::PgRecord {
            id: 7,
            tenant: "t".into(),
            name: "drill-1-main".into(),
            drill: 1,
            drill_source: 3,
            ..Default::default()
        };
        cx.put_pg_record(&drill_pg);
        let bound = |pg| pb::VolumeNameRecord { pg, volume: 1 };
        cx.catalog_put(catalog::volume_name_key("t", "drill-1-v"), &bound(7));
        cx.catalog_put(catalog::volume_name_key("t", "v"), &bound(3));
        let bound_bucket = |pg| pb::BucketNameRecord {
            tenant_id: 1,
            pg,
            bucket: 2,
        };
        cx.catalog_put(catalog::bucket_name_key("b-drill-1"), &bound_bucket(7));
        cx.catalog_put(catalog::bucket_name_key("b"), &bound_bucket(3));
        let mut running = pb::DrillRecord {
            id: 1,
            state: pb::DrillState::DrillRunning as i32,
            pgs: vec![pb::DrillPg {
                source_pg: 3,
                tenant: "t".into(),
                drill_pg: 7,
                volumes: vec![
                    pb::DrillVolume {
                        name: "drill-1-v".into(),
                        ..Default::default()
                    },
                    pb::DrillVolume {
                        name: "v".into(),
                        ..Default::default()
                    },
                ],
                buckets: vec![
                    pb::DrillBucket {
                        name: "b-drill-1".into(),
                        ..Default::default()
                    },
                    pb::DrillBucket {
                        name: "b".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..start.clone()
        };
        assert!(
            cx.apply_command(LogIndex(3), &put(running.clone()))
                .unwrap()
                .is_ok()
        );

        let io_of = |name: &str, at_ms, bucket| {
            cmd(
                6,
                pb::command::Kind::RecordDrillIo(pb::RecordDrillIo {
                    drill: 1,
                    volume: name.into(),
                    at_ms,
                    bucket,
                }),
            )
        };
        let io = |volume: &str, at_ms| io_of(volume, at_ms, false);
        assert_eq!(
            cx.apply_command(LogIndex(4), &io("drill-1-v", 40)).unwrap(),
            Ok(Applied::Done)
        );
        cx.apply_command(LogIndex(5), &io("drill-1-v", 90))
            .unwrap()
            .unwrap();
        assert_eq!(
            drill(&cx, 1).pgs[0].volumes[0].first_io_ms,
            40,
            "the first counts"
        );
        assert!(matches!(
            cx.apply_command(LogIndex(6), &io("nope", 1)).unwrap(),
            Err(Rejection::Malformed { .. })
        ));
        assert!(
            matches!(
                cx.apply_command(LogIndex(6), &io_of("drill-1-v", 1, true))
                    .unwrap(),
                Err(Rejection::Malformed { .. })
            ),
            "a volume's name is no bucket"
        );
        cx.apply_command(LogIndex(6), &io_of("b-drill-1", 55, true))
            .unwrap()
            .unwrap();
        assert_eq!(drill(&cx, 1).pgs[0].buckets[0].first_io_ms, 55);
        let lag = |drill, seconds| {
            cmd(
                6,
                pb::command::Kind::RecordDrillLag(pb::RecordDrillLag {
                    drill,
                    source_pg: 3,
                    lag_seconds: seconds,
                    lag_entries: 4,
                }),
            )
        };
        cx.apply_command(LogIndex(7), &lag(1, 0.5))
            .unwrap()
            .unwrap();
        cx.apply_command(LogIndex(8), &lag(1, 0.25))
            .unwrap()
            .unwrap();
        assert!(matches!(
            cx.apply_command(LogIndex(9), &lag(1, f64::NAN)).unwrap(),
            Err(Rejection::Malformed { .. })
        ));
        assert_eq!(
            cx.apply_command(LogIndex(10), &lag(9, 0.1)).unwrap(),
            Err(Rejection::DrillNotFound { drill: 9 })
        );
        let p = &drill(&cx, 1).pgs[0];
        assert_eq!(
            (p.lag_max_seconds, p.lag_samples, p.lag_sum_seconds),
            (0.5, 2, 0.75)
        );

        // The starter writes its record again: what was observed stays.
        running.ready_ms = 77;
        cx.apply_command(LogIndex(11), &put(running.clone()))
            .unwrap()
            .unwrap();
        let d = drill(&cx, 1);
        assert_eq!(d.ready_ms, 77);
        assert_eq!(d.pgs[0].volumes[0].first_io_ms, 40);
        assert_eq!(d.pgs[0].buckets[0].first_io_ms, 55);
        assert_eq!(d.pgs[0].lag_samples, 2);
        let stopped_by_put = pb::DrillRecord {
            state: pb::DrillState::DrillStopped as i32,
            ..running.clone()
        };
        assert!(matches!(
            cx.apply_command(LogIndex(12), &put(stopped_by_put))
                .unwrap(),
            Err(Rejection::Malformed { .. })
        ));

        // A PG of another drill in its record is refused, changing nothing.
        let mut wrong = running.clone();
        wrong.id = 2;
        wrong.pgs[0].drill_pg = 7;
        cx.apply_command(LogIndex(13), &put(wrong))
            .unwrap()
            .unwrap();
        let stop = |drill| cmd(8, pb::command::Kind::StopDrill(pb::StopDrill { drill }));
        assert!(matches!(
            cx.apply_command(LogIndex(14), &stop(2)).unwrap(),
            Err(Rejection::Malformed { .. })
        ));
        assert!(
            cx.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(7))
                .unwrap()
                .is_some()
        );
        assert!(
            cx.catalog_get::<pb::VolumeNameRecord>(&catalog::volume_name_key("t", "drill-1-v"))
                .unwrap()
                .is_some(),
            "a refused stop unbinds nothing"
        );

        assert_eq!(
            cx.apply_command(LogIndex(15), &stop(1)).unwrap(),
            Ok(Applied::Done)
        );
        let d = drill(&cx, 1);
        assert_eq!(d.state, pb::DrillState::DrillStopped as i32);
        assert_eq!(d.stopped_ms, 8);
        assert!(
            cx.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(7))
                .unwrap()
                .is_none()
        );
        assert!(
            cx.catalog_get::<pb::PgRecord>(&catalog::pg_key("t", "drill-1-main"))
                .unwrap()
                .is_none()
        );
        assert!(
            cx.catalog_get::<pb::VolumeNameRecord>(&catalog::volume_name_key("t", "drill-1-v"))
                .unwrap()
                .is_none()
        );
        assert!(
            cx.catalog_get::<pb::VolumeNameRecord>(&catalog::volume_name_key("t", "v"))
                .unwrap()
                .is_some(),
            "a name bound to another PG stays"
        );
        assert!(
            cx.catalog_get::<pb::BucketNameRecord>(&catalog::bucket_name_key("b-drill-1"))
                .unwrap()
                .is_none()
        );
        assert!(
            cx.catalog_get::<pb::BucketNameRecord>(&catalog::bucket_name_key("b"))
                .unwrap()
                .is_some(),
            "a bucket name bound to another PG stays"
        );
        assert_eq!(
            cx.apply_command(LogIndex(16), &stop(1)).unwrap(),
            Ok(Applied::Done),
            "again: done"
        );
        assert_eq!(
            cx.apply_command(LogIndex(17), &put(running)).unwrap(),
            Err(Rejection::DrillStopped { drill: 1 })
        );
        assert_eq!(
            cx.apply_command(LogIndex(18), &lag(1, 0.1)).unwrap(),
            Err(Rejection::DrillStopped { drill: 1 })
        );
        assert_eq!(
            cx.apply_command(LogIndex(19), &stop(5)).unwrap(),
            Err(Rejection::DrillNotFound { drill: 5 })
        );
    }

    /// A drill's PG stays at its site, names both its drill and source,
    /// and a drill's clone names another tenant PG as its base.
    #[test]
    fn drill_pgs_and_clones_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        cx.catalog_put(
            catalog::CLUSTER_KEY.to_vec(),
            &pb::ClusterRecord {
                site: "primary".into(),
                ..Default::default()
            },
        );
        cx.catalog_put(
            catalog::tenant_key("t"),
            &pb::TenantRecord {
                id: 1,
                name: "t".into(),
                ..Default::default()
            },
        );
        let create = |name: &str, drill, drill_source| {
            cmd(
                1,
                pb::command::Kind::CreatePg(pb::CreatePg {
                    tenant: "t".into(),
                    name: name.into(),
                    active_site: "dr".into(),
                    drill,
                    drill_source,
                    ..Default::default()
                }),
            )
        };
        assert!(matches!(
            cx.apply_command(LogIndex(1), &create("half", 1, 0))
                .unwrap(),
            Err(Rejection::Malformed { .. })
        ));
        let Ok(Applied::PgCreated { pg }) = cx
            .apply_command(LogIndex(2), &create("drill-1-main", 1, 3))
            .unwrap()
        else {
            panic!("created");
        };
        let r: pb::PgRecord = cx.catalog_get(&catalog::pg_id_key(pg)).unwrap().unwrap();
        assert_eq!(
            (r.active_site.as_str(), r.drill, r.drill_source),
            ("dr", 1, 3)
        );
        let switch = cmd(
            1,
            pb::command::Kind::SwitchActiveSite(pb::SwitchActiveSite {
                pgs: vec![pg],
                to_site: "primary".into(),
            }),
        );
        assert!(matches!(
            cx.apply_command(LogIndex(3), &switch).unwrap(),
            Err(Rejection::Malformed { .. })
        ));

        let mut cx = ApplyContext::new(&db, PgId(pg));
        let clone = |volume, base_pg| {
            cmd(
                1,
                pb::command::Kind::CreateVolume(pb::CreateVolume {
                    volume,
                    name: format!("drill-1-v{volume}"),
                    size_bytes: 4096,
                    base: Some(pb::VolumeBase {
                        volume: 9,
                        index: 100,
                        pg: Some(base_pg),
                    }),
                }),
            )
        };
        for bad in [pg, 0] {
            assert!(matches!(
                cx.apply_command(LogIndex(1), &clone(1, bad)).unwrap(),
                Err(Rejection::Malformed { .. })
            ));
        }
        // Index 100 of PG 3 is past this PG's own log: not its business.
        assert_eq!(
            cx.apply_command(LogIndex(2), &clone(2, 3)).unwrap(),
            Ok(Applied::Done)
        );
    }
}
