//! Stand-ins for unit tests that need a port but none of its data.

use async_trait::async_trait;
use msghash_common::ports::{ModelError, Offset, ProjectionBatch};
use msghash_common::{Digest, ReadModel};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A read model that only knows its applied offsets (none at first): no rows, an empty
/// listing, `apply` records nothing.
#[derive(Default)]
pub struct OffsetsOnly {
    applied: Mutex<BTreeMap<u32, Offset>>,
}

impl OffsetsOnly {
    /// Says `offset` is applied for `partition`.
    pub fn set(&self, partition: u32, offset: Offset) {
        self.applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(partition, offset);
    }
}

#[async_trait]
impl ReadModel for OffsetsOnly {
    async fn apply(&self, _: &ProjectionBatch) -> Result<(), ModelError> {
        Ok(())
    }
    async fn get(&self, _: &Digest) -> Result<Option<String>, ModelError> {
        Ok(None)
    }
    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError> {
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(applied.get(&partition).copied())
    }
    async fn list(&self, _: Option<&Digest>, _: usize) -> Result<Vec<Digest>, ModelError> {
        Ok(Vec::new())
    }
}
