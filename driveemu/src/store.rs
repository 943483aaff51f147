//! The emulated Drive's state: files, folders, shared drives, revisions and pre-generated ids.
//!
//! Everything here is synchronous and lives under one mutex; the HTTP layer never holds it
//! across an await. Errors are the Drive errors the wire layer sends as they are.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use md5::Digest as _;
use rand::rngs::StdRng;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::util::{new_file_id, new_root_id, opaque, rfc3339};

pub(crate) const FOLDER_MIME: &str = "application/vnd.google-apps.folder";
pub(crate) const SHORTCUT_MIME: &str = "application/vnd.google-apps.shortcut";

/// Google-native types (Docs, Sheets, folders, shortcuts ...) hold no bytes of their own.
pub(crate) fn is_google_type(mime: &str) -> bool {
    mime.starts_with("application/vnd.google-apps.")
}

/// File bytes with the checksums Drive reports for them. Each checksum is computed the
/// first time a response asks for it: hashing is the slowest thing the emulator does
/// (unoptimised test builds hash at tens of MB/s), and most responses ask for none.
#[derive(Clone)]
pub(crate) struct Content {
    pub data: Bytes,
    sums: Arc<[OnceLock<String>; 3]>,
}

impl Content {
    pub fn new(data: Bytes) -> Content {
        Content { data, sums: Arc::new([OnceLock::new(), OnceLock::new(), OnceLock::new()]) }
    }
    pub fn md5(&self) -> &str {
        self.sums[0].get_or_init(|| hex::encode(md5::Md5::digest(&self.data)))
    }
    pub fn sha1(&self) -> &str {
        self.sums[1].get_or_init(|| hex::encode(sha1::Sha1::digest(&self.data)))
    }
    pub fn sha256(&self) -> &str {
        self.sums[2].get_or_init(|| hex::encode(sha2::Sha256::digest(&self.data)))
    }
}

/// Which members a response will keep (checksums are only computed when kept).
pub(crate) type Want<'a> = &'a dyn Fn(&str) -> bool;

#[derive(Clone)]
pub(crate) struct Revision {
    pub id: String,
    pub content: Content,
    pub mime: String,
    pub modified_ms: i64,
    pub keep_forever: bool,
    pub original_filename: Option<String>,
}

impl Revision {
    pub fn to_json(&self, want: Want) -> Value {
        let mut v = json!({
            "kind": "drive#revision",
            "id": self.id,
            "mimeType": self.mime,
            "modifiedTime": rfc3339(self.modified_ms),
            "keepForever": self.keep_forever,
            "published": false,
            "size": self.content.data.len().to_string(),
            "originalFilename": self.original_filename,
        });
        if want("md5Checksum") {
            v["md5Checksum"] = json!(self.content.md5());
        }
        v
    }
}

#[derive(Clone)]
pub(crate) struct FileRec {
    pub id: String,
    pub name: String,
    pub mime_type: String,
    pub parents: Vec<String>,
    pub drive_id: Option<String>,
    /// None for folders and other Google-native types.
    pub content: Option<Content>,
    pub version: u64,
    pub revisions: Vec<Revision>,
    pub created_ms: i64,
    pub modified_ms: i64,
    pub trashed: bool,
    pub explicitly_trashed: bool,
    pub starred: bool,
    pub description: Option<String>,
    pub original_filename: Option<String>,
    pub app_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    /// Creation order, the default listing order and the tie-breaker of every order.
    pub seq: u64,
    /// files.list does not show the file before this instant (`listing_lag`).
    pub listable_at: Instant,
    /// My Drive's root or a shared drive's root folder: never listed, never trashed.
    pub is_root: bool,
    /// Flagged as malware/spam: downloads need `acknowledgeAbuse=true`.
    pub abusive: bool,
    /// Shared with the user as a reader only: every write answers 403.
    pub read_only: bool,
    /// Its owner turned downloading off for readers
    /// (`downloadRestrictions.itemDownloadRestriction.restrictedForReaders`).
    pub download_restricted: bool,
}

impl FileRec {
    /// The root folder of My Drive (`drive_id` None) or of a shared drive.
    fn root(id: String, name: &str, drive_id: Option<String>, seq: u64, now: i64) -> FileRec {
        FileRec {
            id,
            name: name.to_string(),
            mime_type: FOLDER_MIME.into(),
            parents: vec![],
            drive_id,
            content: None,
            version: 1,
            revisions: vec![],
            created_ms: now,
            modified_ms: now,
            trashed: false,
            explicitly_trashed: false,
            starred: false,
            description: None,
            original_filename: None,
            app_properties: BTreeMap::new(),
            properties: BTreeMap::new(),
            seq,
            listable_at: Instant::now(),
            is_root: true,
            abusive: false,
            read_only: false,
            download_restricted: false,
        }
    }

    /// Whether the user may download or copy it: not when its owner
    /// restricted that for readers and the user is one.
    pub fn may_download(&self) -> bool {
        !(self.read_only && self.download_restricted)
    }

    pub fn size(&self) -> u64 {
        self.content.as_ref().map_or(0, |c| c.data.len() as u64)
    }

    pub fn head_revision_id(&self) -> Option<&str> {
        self.revisions.last().map(|r| r.id.as_str())
    }

    /// The resource as Drive's v3 `File` JSON (before any `fields=` mask); checksums only
    /// if `want` asks for them.
    pub fn to_json(&self, want: Want) -> Value {
        let mut v = json!({
            "kind": "drive#file",
            "id": self.id,
            "name": self.name,
            "mimeType": self.mime_type,
            "starred": self.starred,
            "trashed": self.trashed,
            "explicitlyTrashed": self.explicitly_trashed,
            "parents": self.parents,
            "spaces": ["drive"],
            "version": self.version.to_string(),
            "createdTime": rfc3339(self.created_ms),
            "modifiedTime": rfc3339(self.modified_ms),
            "ownedByMe": self.drive_id.is_none(),
            "quotaBytesUsed": self.size().to_string(),
            "isAppAuthorized": true,
            "downloadRestrictions": {
                "itemDownloadRestriction": { "restrictedForReaders": self.download_restricted, "restrictedForWriters": false },
                "effectiveDownloadRestrictionWithContext": { "restrictedForReaders": self.download_restricted, "restrictedForWriters": false },
            },
            "capabilities": {
                "canEdit": !self.read_only, "canDownload": self.may_download(), "canTrash": !self.read_only, "canDelete": !self.read_only,
                "canAddChildren": self.mime_type == FOLDER_MIME && !self.read_only, "canRename": !self.read_only,
            },
        });
        if self.parents.is_empty() {
            v.as_object_mut().map(|o| o.remove("parents"));
        }
        if let Some(d) = &self.drive_id {
            v["driveId"] = json!(d);
            v["teamDriveId"] = json!(d);
        }
        if let Some(c) = &self.content {
            v["size"] = json!(c.data.len().to_string());
            if want("md5Checksum") {
                v["md5Checksum"] = json!(c.md5());
            }
            if want("sha1Checksum") {
                v["sha1Checksum"] = json!(c.sha1());
            }
            if want("sha256Checksum") {
                v["sha256Checksum"] = json!(c.sha256());
            }
            if let Some(h) = self.head_revision_id() {
                v["headRevisionId"] = json!(h);
            }
            if let Some((_, ext)) = self.name.rsplit_once('.') {
                if !ext.is_empty() {
                    v["fileExtension"] = json!(ext);
                    v["fullFileExtension"] = json!(ext);
                }
            }
            v["originalFilename"] = json!(self.original_filename.clone().unwrap_or_else(|| self.name.clone()));
        }
        if let Some(d) = &self.description {
            v["description"] = json!(d);
        }
        if !self.app_properties.is_empty() {
            v["appProperties"] = json!(self.app_properties);
        }
        if !self.properties.is_empty() {
            v["properties"] = json!(self.properties);
        }
        v
    }
}

#[derive(Clone)]
pub(crate) struct DriveRec {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
}

impl DriveRec {
    pub fn to_json(&self) -> Value {
        json!({ "kind": "drive#drive", "id": self.id, "name": self.name, "createdTime": rfc3339(self.created_ms), "hidden": false })
    }
}

/// Metadata for a new file, already validated by the wire layer.
#[derive(Default, Clone)]
pub(crate) struct NewFile {
    pub id: Option<String>,
    pub name: Option<String>,
    pub mime_type: Option<String>,
    pub parents: Vec<String>,
    pub description: Option<String>,
    pub starred: bool,
    pub app_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    pub created_ms: Option<i64>,
    pub modified_ms: Option<i64>,
    pub original_filename: Option<String>,
    pub keep_forever: bool,
}

/// Drive's answer to a write on an item the user may only read.
pub(crate) fn no_write(id: &str) -> ApiError {
    ApiError::new(
        403,
        "global",
        "insufficientFilePermissions",
        format!("The user does not have sufficient permissions for file {id}."),
    )
}

pub(crate) struct Store {
    pub files: HashMap<String, FileRec>,
    /// Ids handed out by generateIds and not used yet (Drive accepts only those as `id`).
    pub generated: HashSet<String>,
    pub drives: HashMap<String, DriveRec>,
    pub root_id: String,
    pub rng: StdRng,
    seq: u64,
}

impl Store {
    pub fn new(mut rng: StdRng) -> Store {
        let root_id = new_root_id(&mut rng);
        let now = crate::util::now_ms();
        let root = FileRec::root(root_id.clone(), "My Drive", None, 0, now);
        let mut files = HashMap::new();
        files.insert(root_id.clone(), root);
        Store { files, generated: HashSet::new(), drives: HashMap::new(), root_id, rng, seq: 1 }
    }

    /// Maps the `root` alias to My Drive's root id.
    pub fn canon<'a>(&'a self, id: &'a str) -> &'a str {
        if id == "root" {
            &self.root_id
        } else {
            id
        }
    }

    /// Looks a file up as the API sees it: shared-drive items exist only for callers that
    /// pass `supportsAllDrives=true` (Drive answers 404 otherwise).
    pub fn get(&self, id: &str, all_drives: bool) -> Result<&FileRec, ApiError> {
        match self.files.get(self.canon(id)) {
            Some(f) if f.drive_id.is_none() || all_drives => Ok(f),
            _ => Err(ApiError::file_not_found(id)),
        }
    }

    pub fn get_mut(&mut self, id: &str, all_drives: bool) -> Result<&mut FileRec, ApiError> {
        let id_c = self.canon(id).to_string();
        match self.files.get_mut(&id_c) {
            Some(f) if f.drive_id.is_none() || all_drives => Ok(f),
            _ => Err(ApiError::file_not_found(id)),
        }
    }

    pub fn generate_ids(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let id = new_file_id(&mut self.rng);
                self.generated.insert(id.clone());
                id
            })
            .collect()
    }

    pub fn new_revision_id(&mut self) -> String {
        format!("0B{}", opaque(&mut self.rng, 49))
    }

    /// Bytes counted against the user's storage quota: My Drive files, trash included
    /// (Drive counts trashed files until they are deleted).
    pub fn bytes_used(&self) -> u64 {
        self.files.values().filter(|f| f.drive_id.is_none()).map(|f| f.size()).sum()
    }

    /// Checks that a caller-supplied id may be used for a new file (files.create/copy).
    pub fn check_new_id(&self, id: &str, mime: &str) -> Result<(), ApiError> {
        if self.files.contains_key(id) {
            // "Create and manage files": a later create with a used generated id answers 409.
            return Err(ApiError::new(409, "global", "fileIdInUse", "A file already exists with the provided ID.")
                .at("other", "file.id"));
        }
        if !self.generated.contains(id) || mime == SHORTCUT_MIME {
            // Drive refuses ids it did not generate (and, as observed, for shortcuts).
            return Err(ApiError::new(400, "global", "fileIdNotUsable", "The provided file ID is not usable.")
                .at("other", "file.id"));
        }
        if is_google_type(mime) && mime != FOLDER_MIME {
            return Err(ApiError::new(
                403,
                "global",
                "insufficientFilePermissions",
                "Generated IDs are not supported for Docs Editors formats.",
            ));
        }
        Ok(())
    }

    /// Resolves and validates the parent list of a new item; returns (parents, driveId).
    pub fn resolve_parents(
        &self,
        parents: &[String],
        all_drives: bool,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        if parents.len() > 1 {
            // Since 2020 an item has exactly one parent.
            return Err(ApiError::new(
                403,
                "global",
                "cannotAddParent",
                "Increasing the number of parents is not allowed.",
            ));
        }
        let pid = parents.first().map(|p| self.canon(p).to_string()).unwrap_or_else(|| self.root_id.clone());
        let parent = self.get(&pid, all_drives).map_err(|_| ApiError::file_not_found(&pid))?;
        if parent.mime_type != FOLDER_MIME {
            return Err(ApiError::bad_request(format!("The parent {pid} is not a folder.")).at("other", "parents"));
        }
        if parent.read_only {
            return Err(no_write(&pid));
        }
        Ok((vec![pid], parent.drive_id.clone()))
    }

    /// Creates a file or folder. `content` is None for metadata-only creates of folders and
    /// Google-native types; a metadata-only create of any other type makes an empty file.
    pub fn create(
        &mut self,
        meta: NewFile,
        content: Option<Bytes>,
        all_drives: bool,
        listing_lag: std::time::Duration,
        media_mime: Option<&str>,
    ) -> Result<String, ApiError> {
        let mime = meta
            .mime_type
            .clone()
            .or_else(|| media_mime.map(|m| m.to_string()))
            .unwrap_or_else(|| "application/octet-stream".into());
        if let Some(id) = &meta.id {
            self.check_new_id(id, &mime)?;
        }
        let (parents, drive_id) = self.resolve_parents(&meta.parents, all_drives)?;
        let google = is_google_type(&mime);
        if google && content.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(ApiError::bad_request("Conversion to Google-native formats is not emulated."));
        }
        let now = crate::util::now_ms();
        let id = match meta.id {
            Some(id) => {
                self.generated.remove(&id);
                id
            }
            None => new_file_id(&mut self.rng),
        };
        let content = if google { None } else { Some(Content::new(content.unwrap_or_default())) };
        let modified = meta.modified_ms.unwrap_or(now);
        let revisions = match &content {
            Some(c) => vec![Revision {
                id: self.new_revision_id(),
                content: c.clone(),
                mime: mime.clone(),
                modified_ms: modified,
                keep_forever: meta.keep_forever,
                original_filename: meta.original_filename.clone(),
            }],
            None => vec![],
        };
        self.seq += 1;
        let rec = FileRec {
            id: id.clone(),
            name: meta.name.unwrap_or_else(|| "Untitled".into()),
            mime_type: mime,
            parents,
            drive_id,
            content,
            version: 1,
            revisions,
            created_ms: meta.created_ms.unwrap_or(now),
            modified_ms: modified,
            trashed: false,
            explicitly_trashed: false,
            starred: meta.starred,
            description: meta.description,
            original_filename: meta.original_filename,
            app_properties: meta.app_properties,
            properties: meta.properties,
            seq: self.seq,
            listable_at: Instant::now() + listing_lag,
            is_root: false,
            abusive: false,
            read_only: false,
            download_restricted: false,
        };
        self.files.insert(id.clone(), rec);
        // Made in a folder in the trash: trashed with it, not explicitly.
        self.inherit_trash(&id);
        Ok(id)
    }

    /// Replaces a file's bytes (files.update with media): a new head revision.
    pub fn replace_content(
        &mut self,
        id: &str,
        data: Bytes,
        all_drives: bool,
        keep_forever: bool,
        media_mime: Option<&str>,
    ) -> Result<(), ApiError> {
        let rev_id = self.new_revision_id();
        let f = self.get_mut(id, all_drives)?;
        if f.read_only {
            return Err(no_write(id));
        }
        if is_google_type(&f.mime_type) {
            return Err(ApiError::bad_request("Google-native files and folders have no binary content to replace."));
        }
        let c = Content::new(data);
        let now = crate::util::now_ms();
        if let Some(m) = media_mime {
            f.mime_type = m.to_string();
        }
        f.revisions.push(Revision {
            id: rev_id,
            content: c.clone(),
            mime: f.mime_type.clone(),
            modified_ms: now,
            keep_forever,
            original_filename: f.original_filename.clone(),
        });
        f.content = Some(c);
        f.modified_ms = now;
        f.version += 1;
        Ok(())
    }

    /// Ids of `id` and everything below it (folders trash and delete recursively in Drive).
    pub fn subtree(&self, id: &str) -> Vec<String> {
        let mut out = vec![id.to_string()];
        let mut i = 0;
        while i < out.len() {
            let cur = out[i].clone();
            for f in self.files.values() {
                if f.parents.contains(&cur) {
                    out.push(f.id.clone());
                }
            }
            i += 1;
        }
        out
    }

    pub fn set_trashed(&mut self, id: &str, trashed: bool) {
        let ids = self.subtree(id);
        for (n, fid) in ids.iter().enumerate() {
            if let Some(f) = self.files.get_mut(fid) {
                if f.trashed != trashed {
                    f.trashed = trashed;
                    f.version += 1;
                }
                if n == 0 {
                    f.explicitly_trashed = trashed;
                } else if !trashed {
                    f.explicitly_trashed = false;
                }
            }
        }
    }

    /// Brings `trashed` of `id` and what is below it in line with its parent
    /// after a move: "trashed, either explicitly or from a trashed parent
    /// folder" (the files resource), so an item explicitly trashed stays so
    /// and the rest follow the folder above them.
    pub fn inherit_trash(&mut self, id: &str) {
        // `subtree` lists parents before their children.
        for fid in self.subtree(id) {
            let Some(f) = self.files.get(&fid) else { continue };
            let from_parent = f.parents.first().and_then(|p| self.files.get(p)).is_some_and(|p| p.trashed);
            let trashed = f.explicitly_trashed || from_parent;
            if let Some(f) = self.files.get_mut(&fid) {
                if f.trashed != trashed {
                    f.trashed = trashed;
                    f.version += 1;
                }
            }
        }
    }

    pub fn delete(&mut self, id: &str) {
        for fid in self.subtree(id) {
            self.files.remove(&fid);
        }
    }

    pub fn create_drive(&mut self, name: &str) -> DriveRec {
        let id = new_root_id(&mut self.rng);
        let now = crate::util::now_ms();
        let d = DriveRec { id: id.clone(), name: name.to_string(), created_ms: now };
        self.seq += 1;
        let root = FileRec::root(id.clone(), name, Some(id.clone()), self.seq, now);
        self.files.insert(id.clone(), root);
        self.drives.insert(id, d.clone());
        d
    }
}
