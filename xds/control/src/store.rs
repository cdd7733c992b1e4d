//! The control plane's durable store: one file per object, every write atomic (temp + fsync + rename + directory
//! fsync), and each apply or delete committed through a journal, so a multi-object apply is all-or-nothing.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use ferry_api::config::{ConfigError, Document, document_json, one_traffic_policy_error, parse_value};
use ferry_api::hex;

/// Which object: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn of(doc: &Document) -> Key {
        let m = doc.metadata();
        Key { kind: doc.kind().to_string(), namespace: m.namespace.clone(), name: m.name.clone() }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// An accepted object: the document and its versions.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub document: Document,
    /// Store-wide and monotonic: the revision of the commit that last wrote it.
    pub resource_version: u64,
    /// Per object: 1 at creation, +1 on each change of its content.
    pub generation: u64,
}

impl Stored {
    /// The object as the API shows it: the document with `metadata.resourceVersion` and `metadata.generation`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut doc = document_json(&self.document);
        doc["metadata"]["resourceVersion"] = self.resource_version.to_string().into();
        doc["metadata"]["generation"] = self.generation.into();
        doc
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

/// The result of one object of an apply, as `ferryctl apply` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    #[serde(flatten)]
    pub key: Key,
    pub outcome: Outcome,
    pub resource_version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: corrupt ({reason}); refusing to start rather than drop an object — restore or remove this file")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// What a journal commits: objects written and objects removed, under one new revision.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    revision: u64,
    put: Vec<Record>,
    delete: Vec<Key>,
}

/// One object file's content (inside a checksummed envelope).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    resource_version: u64,
    generation: u64,
    document: serde_json::Value,
}

pub struct Store {
    dir: PathBuf,
    objects: BTreeMap<Key, Stored>,
    revision: u64,
}

impl Store {
    /// Opens (or creates) the store in `dir`: finishes a committed journal, then loads every object. Any file that
    /// cannot be read back exactly as written stops the open with an error naming it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let objects_dir = dir.join("objects");
        fs::create_dir_all(&objects_dir).map_err(io(&objects_dir))?;
        let mut store = Store { dir: dir.to_path_buf(), objects: BTreeMap::new(), revision: 0 };
        // An uncommitted journal (never renamed into place) belongs to an apply that never returned success.
        let _ = fs::remove_file(dir.join("journal.json.tmp"));
        let journal_path = dir.join("journal.json");
        if journal_path.exists() {
            let journal: Journal = read_envelope(&journal_path)?;
            store.write_objects(&journal)?;
            store.finish(&journal)?;
        }
        let revision_path = dir.join("revision");
        if revision_path.exists() {
            let text = fs::read_to_string(&revision_path).map_err(io(&revision_path))?;
            store.revision = text.trim().parse().map_err(|_| StoreError::Corrupt {
                path: revision_path.clone(),
                reason: format!("`{}` is not a revision number", text.trim()),
            })?;
        }
        store.load_objects(&objects_dir)?;
        Ok(store)
    }

    fn load_objects(&mut self, dir: &Path) -> Result<(), StoreError> {
        for entry in walk(dir)? {
            if entry.extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(&entry); // an object write that never completed its rename
                continue;
            }
            let record: Record = read_envelope(&entry)?;
            let document = parse_value(record.document.clone())
                .map_err(|e| StoreError::Corrupt { path: entry.clone(), reason: e.to_string() })?;
            let key = Key::of(&document);
            if self.object_path(&key) != entry {
                return Err(StoreError::Corrupt {
                    path: entry,
                    reason: format!("holds {key}, which belongs elsewhere"),
                });
            }
            self.revision = self.revision.max(record.resource_version);
            self.objects.insert(
                key,
                Stored { document, resource_version: record.resource_version, generation: record.generation },
            );
        }
        Ok(())
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get(&self, key: &Key) -> Option<&Stored> {
        self.objects.get(key)
    }

    /// Every stored object.
    pub fn all(&self) -> impl Iterator<Item = &Stored> {
        self.objects.values()
    }

    /// Objects of `kind`, in one namespace or all.
    pub fn list(&self, kind: &str, namespace: Option<&str>) -> Vec<&Stored> {
        self.objects
            .iter()
            .filter(|(k, _)| k.kind == kind && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v)
            .collect()
    }

    /// How many objects of each kind.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for key in self.objects.keys() {
            *counts.entry(key.kind.clone()).or_default() += 1;
        }
        counts
    }

    /// Creates or replaces `documents` (already validated one by one) as one all-or-nothing commit.
    pub fn apply(&mut self, documents: Vec<Document>, dry_run: bool) -> Result<Vec<Applied>, StoreError> {
        self.check_traffic_policy_targets(&documents)?;
        let revision = self.revision + 1;
        let mut results = Vec::new();
        let mut put = Vec::new();
        let now = ferry_api::meta::rfc3339(ferry_api::identity::unix_now());
        for mut document in documents {
            let key = Key::of(&document);
            // The creation time is the store's, as the API server's is: set once, kept by every update.
            let old = self.objects.get(&key);
            document.metadata_mut().creation_timestamp =
                Some(old.and_then(|o| o.document.metadata().creation_timestamp.clone()).unwrap_or_else(|| now.clone()));
            let (outcome, generation, resource_version) = match old {
                None => (Outcome::Created, 1, revision),
                Some(old) if old.document == document => (Outcome::Unchanged, old.generation, old.resource_version),
                Some(old) => (Outcome::Configured, old.generation + 1, revision),
            };
            if outcome != Outcome::Unchanged {
                put.push(Record { resource_version, generation, document: document_json(&document) });
            }
            results.push(Applied { key, outcome, resource_version });
        }
        if !dry_run && !put.is_empty() {
            self.commit(Journal { revision, put, delete: vec![] })?;
        }
        Ok(results)
    }

    /// Deletes one object; `None` when it did not exist.
    pub fn delete(&mut self, key: &Key) -> Result<Option<Stored>, StoreError> {
        let Some(existing) = self.objects.get(key).cloned() else { return Ok(None) };
        self.commit(Journal { revision: self.revision + 1, put: vec![], delete: vec![key.clone()] })?;
        Ok(Some(existing))
    }

    /// One TrafficPolicy per Service, across what is stored and what is being applied; the error names the other.
    fn check_traffic_policy_targets(&self, documents: &[Document]) -> Result<(), ConfigError> {
        let incoming: BTreeMap<Key, &Document> = documents.iter().map(|d| (Key::of(d), d)).collect();
        let mut refused = Vec::new();
        for doc in documents {
            let Document::TrafficPolicy(tp) = doc else { continue };
            let ns = &tp.metadata.namespace;
            let target = &tp.spec.target_ref.name;
            let clash = self.objects.iter().find(|(key, stored)| {
                let Document::TrafficPolicy(other) = &stored.document else { return false };
                key.name != tp.metadata.name
                    && &key.namespace == ns
                    && &other.spec.target_ref.name == target
                    // An existing policy being re-pointed elsewhere in this same apply does not clash.
                    && !incoming.get(key).is_some_and(|d| matches!(d, Document::TrafficPolicy(n) if &n.spec.target_ref.name != target))
            });
            if let Some((key, _)) = clash {
                refused.push((doc.display_name(), vec![one_traffic_policy_error(target, &key.name)]));
            }
        }
        if refused.is_empty() { Ok(()) } else { Err(ConfigError { documents: refused }) }
    }

    /// Makes a journal durable (the commit point), applies it to the object files, then retires it.
    fn commit(&mut self, journal: Journal) -> Result<(), StoreError> {
        write_atomic(&self.dir.join("journal.json"), &envelope(&journal))?;
        self.write_objects(&journal)?;
        self.finish(&journal)
    }

    fn write_objects(&mut self, journal: &Journal) -> Result<(), StoreError> {
        for record in &journal.put {
            let document = parse_value(record.document.clone())?;
            let key = Key::of(&document);
            let path = self.object_path(&key);
            fs::create_dir_all(path.parent().expect("object paths have parents")).map_err(io(&path))?;
            write_atomic(&path, &envelope(record))?;
            self.objects.insert(
                key,
                Stored { document, resource_version: record.resource_version, generation: record.generation },
            );
        }
        for key in &journal.delete {
            let path = self.object_path(key);
            match fs::remove_file(&path) {
                Ok(()) => sync_dir(path.parent().expect("object paths have parents"))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
            self.objects.remove(key);
        }
        Ok(())
    }

    fn finish(&mut self, journal: &Journal) -> Result<(), StoreError> {
        self.revision = self.revision.max(journal.revision);
        write_atomic(&self.dir.join("revision"), self.revision.to_string().as_bytes())?;
        let path = self.dir.join("journal.json");
        fs::remove_file(&path).map_err(io(&path))?;
        sync_dir(&self.dir)
    }

    fn object_path(&self, key: &Key) -> PathBuf {
        self.dir.join("objects").join(&key.kind).join(&key.namespace).join(format!("{}.json", key.name))
    }
}

/// `{"checksum": sha256 of the compact JSON of "data", "data": ...}`: a torn or altered file is detected.
pub(crate) fn envelope<T: Serialize>(data: &T) -> Vec<u8> {
    let value = serde_json::to_value(data).expect("serializable");
    let checksum = hex(&Sha256::digest(serde_json::to_vec(&value).expect("serializable")));
    serde_json::to_vec_pretty(&serde_json::json!({ "checksum": checksum, "data": value })).expect("serializable")
}

pub(crate) fn read_envelope<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { path: path.to_path_buf(), reason };
    let bytes = fs::read(path).map_err(io(path))?;
    let outer: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not the JSON that was written: {e}")))?;
    let (Some(checksum), Some(data)) = (outer.get("checksum").and_then(|c| c.as_str()), outer.get("data")) else {
        return Err(corrupt("no checksum or data".into()));
    };
    let actual = hex(&Sha256::digest(serde_json::to_vec(data).expect("serializable")));
    if actual != checksum {
        return Err(corrupt(format!("checksum mismatch (stored {checksum}, content {actual})")));
    }
    serde_json::from_value(data.clone()).map_err(|e| corrupt(e.to_string()))
}

/// Write to a temp file, fsync it, rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!(
        "{}tmp",
        path.extension().map(|e| format!("{}.", e.to_string_lossy())).unwrap_or_default()
    ));
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(path.parent().expect("store paths have parents"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).map_err(io(&d))? {
            let path = entry.map_err(io(&d))?.path();
            if path.is_dir() { pending.push(path) } else { files.push(path) }
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::parse_documents;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    const DOCS: &str = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: payments}\nspec: {ports: [{port: 80}]}\n---\napiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: payments}\nspec: {targetRef: {kind: Service, name: payments}, timeout: 2s}\n";

    #[test]
    fn apply_reports_created_configured_unchanged_and_survives_reopen() {
        let dir = tmpdir("apply");
        let mut store = Store::open(&dir).unwrap();
        let outcomes = |r: Vec<Applied>| r.into_iter().map(|a| a.outcome).collect::<Vec<_>>();
        assert_eq!(
            outcomes(store.apply(parse_documents(DOCS).unwrap(), false).unwrap()),
            [Outcome::Created, Outcome::Created]
        );
        assert_eq!(
            outcomes(store.apply(parse_documents(DOCS).unwrap(), false).unwrap()),
            [Outcome::Unchanged, Outcome::Unchanged]
        );
        let changed = DOCS.replace("timeout: 2s", "timeout: 3s");
        assert_eq!(
            outcomes(store.apply(parse_documents(&changed).unwrap(), false).unwrap()),
            [Outcome::Unchanged, Outcome::Configured]
        );
        let key = Key { kind: "TrafficPolicy".into(), namespace: "default".into(), name: "payments".into() };
        let before = store.get(&key).unwrap().clone();
        assert_eq!((before.generation, before.resource_version), (2, 2));
        // The creation time is the store's, set at creation and kept by updates (whatever the update says).
        let created = before.document.metadata().creation_timestamp.clone().expect("set at creation");
        assert!(ferry_api::meta::unix_seconds(&created).is_some_and(|t| t > 1_700_000_000), "{created}");
        let claimed = changed.replace(
            "metadata: {name: payments}\nspec: {targetRef",
            "metadata: {name: payments, creationTimestamp: '2001-01-01T00:00:00Z'}\nspec: {targetRef",
        );
        assert_eq!(outcomes(store.apply(parse_documents(&claimed).unwrap(), false).unwrap())[1], Outcome::Unchanged);
        assert_eq!(store.get(&key).unwrap().document.metadata().creation_timestamp.as_deref(), Some(created.as_str()));
        // Dry runs change nothing.
        store.apply(parse_documents(&DOCS.replace("timeout: 2s", "timeout: 9s")).unwrap(), true).unwrap();
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.get(&key), Some(&before));
        assert_eq!(store.revision(), 2);
        assert!(store.delete(&key).unwrap().is_some());
        assert!(store.delete(&key).unwrap().is_none());
        drop(store);
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.get(&key), None);
        assert_eq!(store.revision(), 3, "revisions stay monotonic across deletes and restarts");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn second_traffic_policy_for_a_service_is_refused_naming_the_first() {
        let dir = tmpdir("one-tp");
        let mut store = Store::open(&dir).unwrap();
        store.apply(parse_documents(DOCS).unwrap(), false).unwrap();
        let other =
            DOCS.split("---").nth(1).unwrap().replace("metadata: {name: payments}", "metadata: {name: payments-fast}");
        let err = store.apply(parse_documents(&other).unwrap(), false).unwrap_err().to_string();
        assert!(err.contains("already has TrafficPolicy `payments`"), "{err}");
        assert_eq!(store.counts()["TrafficPolicy"], 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corruption_stops_open_naming_the_file() {
        let dir = tmpdir("corrupt");
        let mut store = Store::open(&dir).unwrap();
        store.apply(parse_documents(DOCS).unwrap(), false).unwrap();
        drop(store);
        let file = dir.join("objects/Service/default/payments.json");
        let text = fs::read_to_string(&file).unwrap();
        for bad in [text[..text.len() / 2].to_string(), text.replace("\"port\": 80", "\"port\": 81")] {
            fs::write(&file, &bad).unwrap();
            let err = Store::open(&dir).err().expect("corruption must stop the open").to_string();
            assert!(err.contains("objects/Service/default/payments.json") && err.contains("corrupt"), "{err}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_committed_journal_is_finished_on_open() {
        let dir = tmpdir("journal");
        let mut store = Store::open(&dir).unwrap();
        store.apply(parse_documents(DOCS).unwrap(), false).unwrap();
        // Simulate a crash after the commit point: the journal is durable, an object file was not yet written.
        let doc = parse_documents(&DOCS.replace("timeout: 2s", "timeout: 5s")).unwrap().remove(1);
        let journal = Journal {
            revision: 2,
            put: vec![Record { resource_version: 2, generation: 2, document: document_json(&doc) }],
            delete: vec![],
        };
        write_atomic(&dir.join("journal.json"), &envelope(&journal)).unwrap();
        fs::write(dir.join("journal.json.tmp"), b"{\"half").unwrap();
        drop(store);
        let store = Store::open(&dir).unwrap();
        let key = Key::of(&doc);
        assert_eq!(store.get(&key).unwrap().document, doc);
        assert!(!dir.join("journal.json").exists() && !dir.join("journal.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
