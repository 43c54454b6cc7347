//! One read of the config directory: what each `*.yaml` / `*.yml` file in
//! it holds right now, or why it cannot be read.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::LocalError;

/// Files above this size are refused: routing config is kilobytes, and a
/// stray multi-gigabyte file in the directory must not exhaust memory.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Every config file of the directory, by name (sorted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirScan {
    pub files: BTreeMap<String, FileRead>,
}

/// What one read found in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileRead {
    /// The file's text, and what tells one version from another: size,
    /// mtime and content hash (mtimes alone miss same-second edits on coarse
    /// filesystems and symlink swaps that keep timestamps).
    Text {
        len: u64,
        modified: Option<SystemTime>,
        content_hash: u64,
        text: Arc<str>,
    },
    /// Listed but not readable as text: why (permissions, a dangling
    /// symbolic link, too large, not UTF-8).
    Unreadable(String),
}

/// Reads every `*.yaml` / `*.yml` file directly in `dir` (not in
/// subdirectories; hidden names, such as a ConfigMap volume's `..data`, are
/// skipped). A directory that does not exist, or is not one, is an error; a
/// file that cannot be read is a [`FileRead::Unreadable`].
pub async fn scan_dir(dir: &Path) -> Result<DirScan, LocalError> {
    let read_dir_error = |source| LocalError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let metadata = tokio::fs::metadata(dir).await.map_err(read_dir_error)?;
    if !metadata.is_dir() {
        return Err(LocalError::NotADirectory(dir.to_owned()));
    }
    let mut entries = tokio::fs::read_dir(dir).await.map_err(read_dir_error)?;
    let mut names = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(read_dir_error)? {
        let Ok(name) = entry.file_name().into_string() else {
            tracing::debug!(dir = %dir.display(), "skipping a file whose name is not UTF-8");
            continue;
        };
        if name.starts_with('.') || !is_config_file_name(&name) {
            continue;
        }
        names.push(name);
    }
    let mut scan = DirScan::default();
    for name in names {
        if let Some(read) = read_file(&dir.join(&name)).await {
            scan.files.insert(name, read);
        }
    }
    Ok(scan)
}

/// `None` when the entry is gone or is not a file (a directory named `x.yaml`).
async fn read_file(path: &Path) -> Option<FileRead> {
    // `metadata` follows symbolic links, as ConfigMap volumes need.
    let metadata = match tokio::fs::metadata(path).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // A link whose target is missing is listed but cannot be read;
            // anything else was deleted between listing and reading.
            let target = tokio::fs::read_link(path).await.ok()?;
            return Some(FileRead::Unreadable(format!(
                "dangling symbolic link to {}",
                target.display()
            )));
        }
        Err(error) => return Some(FileRead::Unreadable(format!("cannot read file: {error}"))),
    };
    if !metadata.is_file() {
        return None;
    }
    if metadata.len() > MAX_CONFIG_FILE_BYTES {
        return Some(FileRead::Unreadable(format!(
            "file is {} bytes, above the {MAX_CONFIG_FILE_BYTES} byte limit",
            metadata.len()
        )));
    }
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => return Some(FileRead::Unreadable(format!("cannot read file: {error}"))),
    };
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    let content_hash = hasher.finish();
    match String::from_utf8(bytes) {
        Ok(text) => Some(FileRead::Text {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            content_hash,
            text: text.into(),
        }),
        Err(error) => Some(FileRead::Unreadable(format!("file is not UTF-8: {error}"))),
    }
}

fn is_config_file_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| extension == "yaml" || extension == "yml")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(read: &FileRead) -> &str {
        match read {
            FileRead::Text { text, .. } => text,
            FileRead::Unreadable(why) => panic!("unreadable: {why}"),
        }
    }

    #[tokio::test]
    async fn reads_yaml_files_sorted_and_skips_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b-server.yml"), "b").expect("write");
        std::fs::write(dir.path().join("a-route.yaml"), "a").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "kind: ModelRoute").expect("write");
        std::fs::write(dir.path().join(".hidden.yaml"), "hidden").expect("write");
        std::fs::create_dir(dir.path().join("nested.yaml")).expect("mkdir");

        let scan = scan_dir(dir.path()).await.expect("scan");
        let names: Vec<&str> = scan.files.keys().map(String::as_str).collect();
        assert_eq!(names, ["a-route.yaml", "b-server.yml"]);
        assert_eq!(text(&scan.files["a-route.yaml"]), "a");
    }

    #[tokio::test]
    async fn a_dangling_symbolic_link_is_listed_as_unreadable() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("..data/routes.yaml", dir.path().join("routes.yaml"))
            .expect("symlink");
        std::fs::write(dir.path().join("target.yaml"), "t").expect("write");
        std::os::unix::fs::symlink("target.yaml", dir.path().join("linked.yaml")).expect("symlink");

        let scan = scan_dir(dir.path()).await.expect("scan");
        assert_eq!(
            scan.files["routes.yaml"],
            FileRead::Unreadable("dangling symbolic link to ..data/routes.yaml".into())
        );
        assert_eq!(text(&scan.files["linked.yaml"]), "t", "a live link is read");
    }

    #[tokio::test]
    async fn a_missing_directory_or_a_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            scan_dir(&dir.path().join("nope")).await,
            Err(LocalError::ReadDir { .. })
        ));
        let file = dir.path().join("file.yaml");
        std::fs::write(&file, "x").expect("write");
        assert!(matches!(
            scan_dir(&file).await,
            Err(LocalError::NotADirectory(_))
        ));
    }
}
