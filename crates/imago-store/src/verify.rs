//! Re-hashing blobs: the whole store, or the blobs of one image.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use imago_oci::Digest;
use serde::Serialize;

use crate::error::{IoContext, Result, StoreError};
use crate::layout::Store;

#[derive(Debug, Clone, Serialize)]
pub struct BlobProblem {
    pub digest: Digest,
    pub path: PathBuf,
    /// What is wrong, in words ("missing", "corrupt: content hashes to ...").
    pub problem: String,
    /// Who refers to the blob, if anyone.
    pub referrer: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    pub problems: Vec<BlobProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Re-hashes every blob reachable from `roots` (manifest digests), or, with `None`, every blob
    /// in the store plus everything the names refer to. Missing, truncated and corrupt blobs are
    /// all reported; this never stops at the first problem.
    pub fn verify(&self, roots: Option<&[Digest]>) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        // digest -> (expected size, referrer)
        let mut expected: BTreeMap<Digest, (Option<u64>, Option<String>)> = BTreeMap::new();
        let root_list: Vec<(Digest, Option<u64>)> = match roots {
            Some(r) => r.iter().map(|d| (d.clone(), None)).collect(),
            None => self
                .names()?
                .into_iter()
                .map(|e| (e.digest, Some(e.size)))
                .collect(),
        };
        for (root, size) in root_list {
            match self.reachable_from(&root, size) {
                Ok(blobs) => {
                    for b in blobs {
                        if b.optional && !self.has_blob(&b.digest) {
                            continue;
                        }
                        expected
                            .entry(b.digest)
                            .or_insert((b.size, Some(b.referrer)));
                    }
                }
                Err(e) => {
                    // The root itself is unreadable; its own check below reports why.
                    let problem = problem_text(&e);
                    report.problems.push(BlobProblem {
                        path: self.blob_path(&root),
                        digest: root.clone(),
                        problem,
                        referrer: Some("index.json".into()),
                    });
                }
            }
        }
        if roots.is_none() {
            let dir = self.blobs_dir();
            for entry in fs::read_dir(&dir).ctx("list", &dir)? {
                let entry = entry.ctx("list", &dir)?;
                match entry
                    .file_name()
                    .to_str()
                    .and_then(|n| Digest::from_hex(n).ok())
                {
                    Some(d) => {
                        expected.entry(d).or_insert((None, None));
                    }
                    None => report.problems.push(BlobProblem {
                        digest: Digest::of(b""),
                        path: entry.path(),
                        problem: "file name is not a sha256 digest".into(),
                        referrer: None,
                    }),
                }
            }
        }
        let already_reported: Vec<Digest> =
            report.problems.iter().map(|p| p.digest.clone()).collect();
        for (digest, (size, referrer)) in expected {
            if already_reported.contains(&digest) {
                continue;
            }
            report.blobs_checked += 1;
            match self.verify_blob(&digest, size) {
                Ok(bytes) => report.bytes_checked += bytes,
                Err(e) => report.problems.push(BlobProblem {
                    path: self.blob_path(&digest),
                    digest,
                    problem: problem_text(&e),
                    referrer,
                }),
            }
        }
        Ok(report)
    }
}

fn problem_text(e: &StoreError) -> String {
    match e {
        StoreError::MissingBlob { .. } => "missing".into(),
        StoreError::CorruptBlob { actual, .. } => format!("corrupt: content hashes to {actual}"),
        StoreError::SizeMismatch {
            expected, actual, ..
        } => {
            format!("wrong size: {actual} bytes, expected {expected}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_entry_the_store_lacks_is_no_problem_but_a_missing_manifest_blob_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let absent = Digest::of(b"the arm64 manifest, never copied");
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": imago_oci::media::OCI_INDEX,
            "manifests": [{
                "mediaType": imago_oci::media::OCI_MANIFEST,
                "digest": absent.to_string(),
                "size": 10,
                "platform": {"os": "linux", "architecture": "arm64"},
            }],
        });
        let (digest, _, _) = store.put_json(&index).unwrap();
        store.tag(&"multi:1".parse().unwrap(), &digest).unwrap();
        let report = store.verify(None).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);

        let config = store.put_blob(b"{}").unwrap();
        let missing_layer = Digest::of(b"a layer that is gone");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": imago_oci::media::OCI_MANIFEST,
            "config": {"mediaType": imago_oci::media::OCI_CONFIG, "digest": config.to_string(), "size": 2},
            "layers": [{"mediaType": imago_oci::media::OCI_LAYER_GZIP, "digest": missing_layer.to_string(), "size": 5}],
        });
        let (image, _, _) = store.put_json(&manifest).unwrap();
        store.tag(&"broken:1".parse().unwrap(), &image).unwrap();
        let report = store.verify(None).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].digest, missing_layer);
    }
}
