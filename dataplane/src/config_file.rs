//! The dataplane's optional configuration file (`--config FILE`, YAML).
//!
//! Sections this build reads:
//!
//! ```yaml
//! accessLogger:
//!   enabled: true
//!   format: json     # or text
//!   output: stdout   # stdout, stderr or a file path
//! ```
//!
//! Unknown top-level sections are ignored so the file can be shared with
//! other tools; unknown keys inside a known section are an error, so a typo
//! does not silently fall back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

/// The parsed file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFile {
    #[serde(default)]
    pub access_logger: Option<AccessLoggerSection>,
}

/// The `accessLogger:` block, as in the Kthena router's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLoggerSection {
    pub enabled: Option<bool>,
    pub format: Option<String>,
    pub output: Option<String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigFileError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_access_logger_block_and_ignores_other_sections() {
        let file = ConfigFile::parse(
            "observability:\n  metrics: {port: 8080}\naccessLogger:\n  enabled: true\n  format: \"text\"\n  output: stderr\n",
        )
        .expect("valid file");
        assert_eq!(
            file.access_logger,
            Some(AccessLoggerSection {
                enabled: Some(true),
                format: Some("text".into()),
                output: Some("stderr".into()),
            })
        );
        assert_eq!(ConfigFile::parse("").expect("empty"), ConfigFile::default());
    }

    #[test]
    fn typos_in_a_known_section_are_errors() {
        let error = ConfigFile::parse("accessLogger:\n  formt: json\n").expect_err("typo");
        assert!(error.to_string().contains("formt"), "{error}");
    }
}
