//! Protocol buffers of Lifeboat: the Raft log entry and command format
//! (`raft`), the admin API (`admin`) and the sealed object records
//! (`objects`). Generated code only; conversions to
//! domain types live in `replication::wire` and `node::admin`.

#![allow(clippy::all)]

pub mod raft {
    tonic::include_proto!("lifeboat.raft");
}

pub mod admin {
    tonic::include_proto!("lifeboat.admin");
}

pub mod objects {
    tonic::include_proto!("lifeboat.objects");
}
