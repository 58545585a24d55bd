//! openraft's storage conformance suite against our log store and state
//! machine (shared/research/openraft.md §5.10).

use lifeboat_replication::TypeConfig;
use lifeboat_replication::log_store::{LogStore, WalSyncer};
use lifeboat_replication::state_machine::StateMachine;
use lifeboat_store::PgId;
use lifeboat_store::db::{Db, DbOptions};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).expect("open db");
        // PG 7: the suite must work for any PG, not only the catalog.
        let pg = PgId(7);
        let log = LogStore::new(db.clone(), pg, WalSyncer::start(db.clone()));
        let sm =
            StateMachine::open(db, pg, &dir.path().join("snapshots")).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_stores_pass_openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}
