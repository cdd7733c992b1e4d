//! Join tokens: a proxy's bootstrap credential in local mode, bound to one namespace + service account, expiring,
//! revocable. Only a SHA-256 of each secret is stored; the secret is shown once, at creation.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_api::identity::unix_now;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{StoreError, envelope, read_envelope, write_atomic};
use ferry_api::hex;

/// What a token grants, and its state (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    pub namespace: String,
    pub service_account: String,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked: bool,
    secret_sha256: String,
}

/// Why a presented token was refused (logged and counted by the xDS server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token (expected <id>.<secret>)")]
    Malformed,
    #[error("unknown token {0}")]
    Unknown(String),
    #[error("token {0} expired")]
    Expired(String),
    #[error("token {0} was revoked")]
    Revoked(String),
}

impl TokenRecord {
    /// What the API shows: everything but the secret's digest.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "createdAt": self.created_at,
            "expiresAt": self.expires_at,
            "revoked": self.revoked,
        })
    }
}

pub struct Tokens {
    dir: PathBuf,
    records: BTreeMap<String, TokenRecord>,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS provides randomness");
    hex(&buf)
}

impl Tokens {
    /// Loads `<state-dir>/tokens/`; a file that does not read back exactly stops the open, naming it.
    pub fn open(state_dir: &Path) -> Result<Tokens, StoreError> {
        let dir = state_dir.join("tokens");
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        let mut records = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })? {
            let path = entry.map_err(|source| StoreError::Io { path: dir.clone(), source })?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let record: TokenRecord = read_envelope(&path)?;
            records.insert(record.id.clone(), record);
        }
        Ok(Tokens { dir, records })
    }

    /// Mints a token for `namespace`/`service_account` valid for `ttl`; returns the record and the token string
    /// (`<id>.<secret>`), which is not kept anywhere.
    pub fn create(
        &mut self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<(TokenRecord, String), StoreError> {
        let (id, secret) = (random_hex(8), random_hex(32));
        let created_at = unix_now();
        let record = TokenRecord {
            id: id.clone(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            created_at,
            expires_at: created_at.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            revoked: false,
            secret_sha256: hex(&Sha256::digest(secret.as_bytes())),
        };
        self.persist(&record)?;
        self.records.insert(id.clone(), record.clone());
        Ok((record, format!("{id}.{secret}")))
    }

    /// Marks a token revoked (kept, so that its use is reported as revoked rather than unknown).
    pub fn revoke(&mut self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let Some(mut record) = self.records.get(id).cloned() else { return Ok(None) };
        record.revoked = true;
        self.persist(&record)?;
        self.records.insert(id.to_string(), record.clone());
        Ok(Some(record))
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.records.get(id).is_some_and(|r| r.revoked)
    }

    pub fn list(&self) -> Vec<&TokenRecord> {
        self.records.values().collect()
    }

    /// The identity a presented token stands for, at `at` (Unix seconds).
    pub fn verify(&self, token: &str, at: i64) -> Result<&TokenRecord, TokenError> {
        let (id, secret) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
        let record = self.records.get(id).ok_or_else(|| TokenError::Unknown(id.to_string()))?;
        let presented = hex(&Sha256::digest(secret.as_bytes()));
        // Constant time over the (fixed-length) digests.
        let same = presented.len() == record.secret_sha256.len()
            && presented.bytes().zip(record.secret_sha256.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !same {
            return Err(TokenError::Unknown(id.to_string()));
        }
        if record.revoked {
            return Err(TokenError::Revoked(id.to_string()));
        }
        if at >= record.expires_at {
            return Err(TokenError::Expired(id.to_string()));
        }
        Ok(record)
    }

    fn persist(&self, record: &TokenRecord) -> Result<(), StoreError> {
        write_atomic(&self.dir.join(format!("{}.json", record.id)), &envelope(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_table_and_persistence() {
        let dir = std::env::temp_dir().join(format!("ferry-tokens-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut tokens = Tokens::open(&dir).unwrap();
        let (good, good_token) = tokens.create("shop", "payments", Duration::from_secs(3600)).unwrap();
        let (revoked, revoked_token) = tokens.create("shop", "orders", Duration::from_secs(3600)).unwrap();
        tokens.revoke(&revoked.id).unwrap();
        let t = unix_now();
        let (id, _) = good_token.split_once('.').unwrap();
        let cases: Vec<(String, i64, Result<&str, TokenError>)> = vec![
            (good_token.clone(), t, Ok("payments")),
            (good_token.clone(), good.expires_at, Err(TokenError::Expired(good.id.clone()))),
            (format!("{id}.{}", "0".repeat(64)), t, Err(TokenError::Unknown(id.to_string()))),
            ("nope.secret".into(), t, Err(TokenError::Unknown("nope".into()))),
            ("no-dot".into(), t, Err(TokenError::Malformed)),
            (revoked_token.clone(), t, Err(TokenError::Revoked(revoked.id.clone()))),
        ];
        for (token, at, want) in &cases {
            let got = tokens.verify(token, *at).map(|r| r.service_account.as_str()).map_err(|e| e.clone());
            assert_eq!(&got, want, "{token}");
        }
        // Only the digest is on disk, and everything survives a restart.
        let on_disk = fs::read_to_string(dir.join("tokens").join(format!("{}.json", good.id))).unwrap();
        assert!(!on_disk.contains(good_token.split_once('.').unwrap().1));
        let reopened = Tokens::open(&dir).unwrap();
        assert_eq!(reopened.verify(&good_token, t).unwrap(), &good);
        assert_eq!(reopened.verify(&revoked_token, t), Err(TokenError::Revoked(revoked.id.clone())));
        fs::remove_dir_all(&dir).unwrap();
    }
}
