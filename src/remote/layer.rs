//! [`Layer`]: a remote that wraps another and forwards every [`Remote`] method it does not change.
//!
//! A decorator implements `Layer` (never `Remote` itself) and overrides only
//! what it changes; the blanket `impl Remote for T: Layer` does the rest. So
//! a method added to `Remote` with a default body reaches the wrapped store
//! through every layer, instead of silently taking the default (no trash, no
//! kept revision, a revision read of the current content) in a layer that
//! forgot to forward it.
//!
//! A layer's type has both traits' methods under the same names, so
//! calls on it name the trait: `Remote::head(self, key)` inside a layer,
//! and `impl super::Layer for X` by path so that code using `X` outside
//! the impl, with only `Remote` imported, can still write `x.get(..)`.

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

use super::{DynRemote, ObjectMeta, PutBody, Remote, RemoteResult, Slot};

/// A [`Remote`] around [`inner`](Layer::inner); each method forwards to it
/// unless overridden. Documentation of each method: see [`Remote`].
#[async_trait]
pub trait Layer: Send + Sync + fmt::Debug {
    /// The store this layer wraps.
    fn inner(&self) -> &DynRemote;

    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        self.inner().get_range(key, range).await
    }

    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        self.inner().get(key).await
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.inner().put(key, body).await
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        self.inner().head(key).await
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.inner().list(prefix).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.inner().list_after(prefix, after).await
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        self.inner().delete(key).await
    }

    async fn listed(&self, key: &str) -> RemoteResult<bool> {
        self.inner().listed(key).await
    }

    async fn list_scratch(&self) -> RemoteResult<Vec<ObjectMeta>> {
        self.inner().list_scratch().await
    }

    async fn delete_scratch(&self, key: &str) -> RemoteResult<()> {
        self.inner().delete_scratch(key).await
    }

    async fn reserve(&self, key: &str) -> RemoteResult<Option<Slot>> {
        self.inner().reserve(key).await
    }

    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.inner().create(key, slot, tag, body).await
    }

    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        self.inner().head_created(key, slot).await
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        self.inner().get_created(key, slot).await
    }

    async fn create_folder(&self) -> RemoteResult<()> {
        self.inner().create_folder().await
    }

    async fn find_trashed(&self, key: &str) -> RemoteResult<Option<ObjectMeta>> {
        self.inner().find_trashed(key).await
    }

    async fn list_trashed(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.inner().list_trashed(prefix).await
    }

    async fn keep_revision(&self, key: &str, revision: &str) -> RemoteResult<()> {
        self.inner().keep_revision(key, revision).await
    }

    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        self.inner().head_revision(key, revision).await
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        self.inner().get_range_revision(key, revision, range).await
    }

    fn locate(&self, key: &str, slot: &Slot) {
        self.inner().locate(key, slot)
    }

    fn describe(&self) -> String {
        self.inner().describe()
    }

    fn reset_connections(&self) {
        self.inner().reset_connections()
    }

    fn bytes_sent(&self) -> Option<u64> {
        self.inner().bytes_sent()
    }
}

#[async_trait]
impl<T: Layer> Remote for T {
    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        Layer::get_range(self, key, range).await
    }

    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        Layer::get(self, key).await
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        Layer::put(self, key, body).await
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        Layer::head(self, key).await
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        Layer::list(self, prefix).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        Layer::list_after(self, prefix, after).await
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        Layer::delete(self, key).await
    }

    async fn listed(&self, key: &str) -> RemoteResult<bool> {
        Layer::listed(self, key).await
    }

    async fn list_scratch(&self) -> RemoteResult<Vec<ObjectMeta>> {
        Layer::list_scratch(self).await
    }

    async fn delete_scratch(&self, key: &str) -> RemoteResult<()> {
        Layer::delete_scratch(self, key).await
    }

    async fn reserve(&self, key: &str) -> RemoteResult<Option<Slot>> {
        Layer::reserve(self, key).await
    }

    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        Layer::create(self, key, slot, tag, body).await
    }

    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        Layer::head_created(self, key, slot).await
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        Layer::get_created(self, key, slot).await
    }

    async fn find_trashed(&self, key: &str) -> RemoteResult<Option<ObjectMeta>> {
        Layer::find_trashed(self, key).await
    }

    async fn list_trashed(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        Layer::list_trashed(self, prefix).await
    }

    async fn keep_revision(&self, key: &str, revision: &str) -> RemoteResult<()> {
        Layer::keep_revision(self, key, revision).await
    }

    async fn create_folder(&self) -> RemoteResult<()> {
        Layer::create_folder(self).await
    }

    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        Layer::head_revision(self, key, revision).await
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        Layer::get_range_revision(self, key, revision, range).await
    }

    fn locate(&self, key: &str, slot: &Slot) {
        Layer::locate(self, key, slot)
    }

    fn describe(&self) -> String {
        Layer::describe(self)
    }

    fn reset_connections(&self) {
        Layer::reset_connections(self)
    }

    fn bytes_sent(&self) -> Option<u64> {
        Layer::bytes_sent(self)
    }
}
