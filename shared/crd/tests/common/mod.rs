//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value;

/// The repository's `testdata/kthena/`: Kthena's example manifests and routing guide, whose
/// origin `testdata/README.md` gives.
pub fn kthena_testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/kthena")
}

/// One YAML document of a Kthena example file.
pub struct ExampleDocument {
    pub file: String,
    pub kind: String,
    pub name: String,
    pub value: Value,
}

/// Every document of every `testdata/kthena/examples/*.yaml`, in file-name order.
pub fn kthena_example_documents() -> Vec<ExampleDocument> {
    let dir = kthena_testdata().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    let mut documents = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|err| panic!("{file}: {err}"));
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            documents.push(ExampleDocument {
                file: file.clone(),
                kind,
                name,
                value,
            });
        }
    }
    documents
}

/// The `openAPIV3Schema` of a CRD as JSON.
pub fn open_api_schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|schema| schema.open_api_v3_schema.as_ref())
        .expect("derived CRDs carry a schema");
    serde_json::to_value(schema).unwrap()
}
