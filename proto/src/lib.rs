//! Protocol buffers of Lifeboat: the Raft log entry and command format
//! (`raft`) and the admin API (`admin`). Generated code only; conversions to
//! domain types live in `replication::wire` and `node::admin`.

#![allow(clippy::all)]

pub mod raft {
    tonic::include_proto!("lifeboat.raft");
}

pub mod admin {
    tonic::include_proto!("lifeboat.admin");
}
