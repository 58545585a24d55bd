//! Test double: exports backed by a `Vec<u8>` behind a mutex.
//!
//! Only for protocol tests; the real volume backend is tested with the
//! daemon. It records every backend call so tests can assert what the server
//! passed through (FUA, trims), and can delay reads to force out-of-order
//! completion.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

use super::{Errno, Export, ExportInfo, ExportProvider, OpenError};

/// How long a read at `offset` sleeps before answering.
pub type ReadDelay = fn(offset: u64) -> Duration;

/// A backend call as the export saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool },
    Trim { offset: u64, len: u32, fua: bool },
    Flush,
}

#[derive(Clone)]
pub struct MemoryExport {
    data: Arc<Mutex<Vec<u8>>>,
    calls: Arc<Mutex<Vec<Call>>>,
    read_only: bool,
    description: String,
    read_delay: Option<ReadDelay>,
    /// Fail every operation with this errno (backend failure tests).
    fail_with: Option<Errno>,
}

impl MemoryExport {
    pub fn new(size_bytes: usize) -> MemoryExport {
        MemoryExport {
            data: Arc::new(Mutex::new(vec![0; size_bytes])),
            calls: Arc::new(Mutex::new(Vec::new())),
            read_only: false,
            description: String::new(),
            read_delay: None,
            fail_with: None,
        }
    }

    pub fn read_only(mut self) -> MemoryExport {
        self.read_only = true;
        self
    }

    pub fn with_description(mut self, description: &str) -> MemoryExport {
        self.description = description.to_owned();
        self
    }

    pub fn with_read_delay(mut self, delay: ReadDelay) -> MemoryExport {
        self.read_delay = Some(delay);
        self
    }

    pub fn failing_with(mut self, errno: Errno) -> MemoryExport {
        self.fail_with = Some(errno);
        self
    }

    pub fn with_data(self, fill: impl Fn(usize) -> u8) -> MemoryExport {
        for (i, byte) in self.lock_data().iter_mut().enumerate() {
            *byte = fill(i);
        }
        self
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.lock_data().clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    fn lock_data(&self) -> MutexGuard<'_, Vec<u8>> {
        lock(&self.data)
    }

    fn record(&self, call: Call) -> Result<(), Errno> {
        lock(&self.calls).push(call);
        match self.fail_with {
            Some(errno) => Err(errno),
            None => Ok(()),
        }
    }

    fn range(offset: u64, len: u32) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).expect("server checked bounds");
        start..start + len as usize
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread poisons the lock; the data is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Export for MemoryExport {
    fn size_bytes(&self) -> u64 {
        self.lock_data().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        if let Some(delay) = self.read_delay {
            tokio::time::sleep(delay(offset)).await;
        }
        self.record(Call::Read { offset, len })?;
        Ok(Bytes::copy_from_slice(
            &self.lock_data()[Self::range(offset, len)],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        let len = data.len() as u32;
        self.record(Call::Write { offset, len, fua })?;
        self.lock_data()[Self::range(offset, len)].copy_from_slice(&data);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), Errno> {
        self.record(Call::WriteZeroes { offset, len, fua })?;
        self.lock_data()[Self::range(offset, len)].fill(0);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), Errno> {
        // Trimmed bytes are unspecified; zeroing them makes tests deterministic.
        self.record(Call::Trim { offset, len, fua })?;
        self.lock_data()[Self::range(offset, len)].fill(0);
        Ok(())
    }

    async fn flush(&self) -> Result<(), Errno> {
        self.record(Call::Flush)
    }
}

#[derive(Default)]
pub struct MemoryProvider {
    exports: BTreeMap<String, MemoryExport>,
}

impl MemoryProvider {
    pub fn with_export(mut self, name: &str, export: MemoryExport) -> MemoryProvider {
        self.exports.insert(name.to_owned(), export);
        self
    }

    pub fn export(&self, name: &str) -> MemoryExport {
        self.exports[name].clone()
    }
}

impl ExportProvider for MemoryProvider {
    type Export = MemoryExport;

    async fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .map(|(name, export)| ExportInfo {
                name: name.clone(),
                size_bytes: export.size_bytes(),
                read_only: export.read_only,
                description: export.description.clone(),
            })
            .collect()
    }

    async fn open(&self, name: &str) -> Result<MemoryExport, OpenError> {
        self.exports
            .get(name)
            .cloned()
            .ok_or_else(|| OpenError::NotFound {
                name: name.to_owned(),
            })
    }
}
