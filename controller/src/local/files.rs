//! What the config directory's files contribute, decided poll by poll.
//!
//! - **Stable before read.** A changed file (new, edited, deleted, or no
//!   longer readable) is used only once it has read the same on
//!   [`WatchSettings::stable_polls`] polls after the one that saw it change,
//!   so a file written in two halves with a pause shorter than that is never
//!   read half-way. Changes are applied together when every changed file is
//!   stable, so files written in one burst (a route and the ModelServer it
//!   names) arrive in one snapshot; a file that keeps changing for longer
//!   than [`WatchSettings::max_delay`] no longer holds back the others.
//! - **Last good version kept.** A file whose new version has any load
//!   problem (YAML syntax, a bad field, unreadable, a dangling link) keeps
//!   contributing the objects of its last version that loaded without
//!   problems, and says so; the problems are reported until it is fixed. A
//!   file that never loaded cleanly contributes what did load.
//! - **Duplicate Pods reported.** A Pod defined twice (same namespace and
//!   name) counts once, from the first file in name order.
//!
//! Pure: time is an input, so the policy is tested without sleeping.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_runtime::clock::Instant;

use super::parse::parse_documents;
use super::scan::{DirScan, FileRead};
use super::{LocalObjects, WatchSettings};
use crate::compile::{LoadProblem, namespace_of};

/// The files of one directory and what each contributes.
#[derive(Debug)]
pub struct DirFiles {
    settings: WatchSettings,
    files: BTreeMap<String, TrackedFile>,
    /// When the oldest change not applied yet was seen.
    pending_since: Option<Instant>,
}

#[derive(Debug)]
struct TrackedFile {
    /// The latest read; `None` = the file is gone.
    latest: Option<FileRead>,
    /// Polls since `latest` was first seen that read it the same.
    unchanged_polls: u32,
    /// The read in use; `None` = never used (a new file).
    applied: Option<Option<FileRead>>,
    /// What the file contributes now.
    contribution: LocalObjects,
    /// The objects of its last version that loaded without problems.
    last_good: Option<LocalObjects>,
}

impl DirFiles {
    pub fn new(settings: WatchSettings) -> Self {
        Self {
            settings,
            files: BTreeMap::new(),
            pending_since: None,
        }
    }

    /// Takes one poll's read of the directory. Returns the directory's
    /// objects when the changes seen so far are ready to be used.
    pub fn observe(&mut self, scan: DirScan, now: Instant) -> Option<LocalObjects> {
        let mut reads = scan.files;
        let names: BTreeSet<String> = self.files.keys().chain(reads.keys()).cloned().collect();
        for name in names {
            let read = reads.remove(&name);
            let file = self.files.entry(name).or_insert_with(|| TrackedFile {
                latest: None,
                unchanged_polls: 0,
                applied: None,
                contribution: LocalObjects::default(),
                last_good: None,
            });
            if file.latest == read {
                file.unchanged_polls = file.unchanged_polls.saturating_add(1);
            } else {
                file.latest = read;
                file.unchanged_polls = 0;
            }
        }
        // A new file that vanished before it was ever used was never there.
        self.files
            .retain(|_, file| file.applied.is_some() || file.latest.is_some());

        let pending: Vec<&String> = self
            .files
            .iter()
            .filter(|(_, file)| file.is_pending())
            .map(|(name, _)| name)
            .collect();
        if pending.is_empty() {
            self.pending_since = None;
            return None;
        }
        let since = *self.pending_since.get_or_insert(now);
        let stable_polls = self.settings.stable_polls;
        let is_stable = |name: &String| self.files[name].unchanged_polls >= stable_polls;
        let all_stable = pending.iter().all(|name| is_stable(name));
        let overdue = now.duration_since(since) >= self.settings.max_delay;
        if !all_stable && !overdue {
            return None;
        }
        let ready: Vec<String> = pending
            .into_iter()
            .filter(|name| is_stable(name))
            .cloned()
            .collect();
        for name in self.files.keys().filter(|name| !ready.contains(name)) {
            if self.files[name].is_pending() {
                tracing::warn!(
                    file = %name,
                    "config file keeps changing; its previous version stays in use until it is stable"
                );
            }
        }
        self.pending_since = (!all_stable).then_some(now);
        if ready.is_empty() {
            return None;
        }
        for name in &ready {
            if let Some(file) = self.files.get_mut(name) {
                file.apply(name);
            }
        }
        self.files.retain(|_, file| file.latest.is_some());
        Some(self.objects())
    }

    /// Whether a change has been seen that is not in use yet.
    pub fn has_pending(&self) -> bool {
        self.files.values().any(TrackedFile::is_pending)
    }

    /// Every file's contribution, in file-name order, duplicate Pods dropped
    /// and reported.
    pub fn objects(&self) -> LocalObjects {
        let mut objects = LocalObjects::default();
        let mut pods_seen: BTreeMap<(String, String), &str> = BTreeMap::new();
        for (name, file) in &self.files {
            let contribution = &file.contribution;
            // Every kind but pods, which are checked for duplicates below.
            macro_rules! gather {
                ($($kind:ident),*) => {
                    $(objects.$kind.extend(contribution.$kind.iter().cloned());)*
                };
            }
            gather!(
                routes,
                servers,
                gateway_classes,
                gateways,
                http_routes,
                inference_pools,
                problems,
                api_keys,
                providers,
                provider_secrets
            );
            for pod in &contribution.pods {
                let namespace = namespace_of(&pod.metadata).to_owned();
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                if pod_name.is_empty() {
                    objects.pods.push(pod.clone());
                    continue;
                }
                match pods_seen.get(&(namespace.clone(), pod_name.clone())) {
                    Some(first) => objects.problems.push(LoadProblem {
                        file: name.clone(),
                        document_index: None,
                        kind: Some("Pod".to_owned()),
                        name: Some(pod_name.clone()),
                        error: format!(
                            "duplicate Pod {namespace}/{pod_name}: {first} already defines it (files are read in name order); this one is ignored"
                        ),
                    }),
                    None => {
                        pods_seen.insert((namespace, pod_name), name);
                        objects.pods.push(pod.clone());
                    }
                }
            }
        }
        objects
    }
}

impl TrackedFile {
    fn is_pending(&self) -> bool {
        match &self.applied {
            Some(applied) => *applied != self.latest,
            None => self.latest.is_some(),
        }
    }

    /// Puts the latest read in use.
    fn apply(&mut self, name: &str) {
        self.applied = Some(self.latest.clone());
        let loaded = match &self.latest {
            None => {
                self.contribution = LocalObjects::default();
                return;
            }
            Some(FileRead::Unreadable(why)) => LocalObjects {
                problems: vec![file_problem(name, why.clone())],
                ..LocalObjects::default()
            },
            Some(FileRead::Text { text, .. }) => {
                let mut objects = LocalObjects::default();
                parse_documents(name, text, &mut objects);
                objects
            }
        };
        if loaded.problems.is_empty() {
            self.last_good = Some(loaded.clone());
            self.contribution = loaded;
            return;
        }
        self.contribution = match &self.last_good {
            Some(good) => {
                let count = good.routes.len()
                    + good.servers.len()
                    + good.pods.len()
                    + good.providers.len()
                    + good.gateway_classes.len()
                    + good.gateways.len()
                    + good.http_routes.len()
                    + good.inference_pools.len();
                let mut kept = good.clone();
                kept.problems = loaded.problems;
                kept.problems.push(file_problem(
                    name,
                    format!(
                        "keeping the {count} objects of this file's last version that loaded without problems until it is fixed"
                    ),
                ));
                kept
            }
            None => loaded,
        };
    }
}

fn file_problem(file: &str, error: String) -> LoadProblem {
    LoadProblem {
        file: file.to_owned(),
        document_index: None,
        kind: None,
        name: None,
        error,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchyard_runtime::clock;

    use super::*;
    use crate::local::parse::tests::{POD, ROUTE, SERVER};

    const POLL: Duration = Duration::from_millis(200);

    fn settings() -> WatchSettings {
        WatchSettings {
            poll_interval: POLL,
            stable_polls: 2,
            max_delay: Duration::from_secs(1),
        }
    }

    fn read(text: &str) -> FileRead {
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(text, &mut hasher);
        FileRead::Text {
            len: text.len() as u64,
            modified: None,
            content_hash: std::hash::Hasher::finish(&hasher),
            text: text.into(),
        }
    }

    fn scan(files: &[(&str, FileRead)]) -> DirScan {
        DirScan {
            files: files
                .iter()
                .map(|(name, read)| ((*name).to_owned(), read.clone()))
                .collect(),
        }
    }

    /// Polls `files` once per poll interval until they are used; returns the
    /// objects and how many polls it took.
    fn poll_until_used(
        dir: &mut DirFiles,
        files: &[(&str, FileRead)],
        start: Instant,
        first_poll: u32,
    ) -> (LocalObjects, u32) {
        for poll in first_poll..first_poll + 20 {
            if let Some(objects) = dir.observe(scan(files), start + POLL * poll) {
                return (objects, poll);
            }
        }
        panic!("never used");
    }

    /// A directory watched from now on.
    fn watched_dir() -> (DirFiles, Instant) {
        (DirFiles::new(settings()), clock::now())
    }

    fn route_names(objects: &LocalObjects) -> Vec<&str> {
        objects
            .routes
            .iter()
            .filter_map(|route| route.metadata.name.as_deref())
            .collect()
    }

    #[test]
    fn a_file_is_used_only_after_reading_the_same_on_two_more_polls() {
        let (mut dir, start) = watched_dir();
        let route = [("routes.yaml", read(ROUTE))];
        assert_eq!(dir.observe(scan(&route), start), None);
        assert_eq!(dir.observe(scan(&route), start + POLL), None);
        let objects = dir
            .observe(scan(&route), start + POLL * 2)
            .expect("stable on the second poll after it was seen");
        assert_eq!(route_names(&objects), ["deepseek-simple"]);
        assert!(!dir.has_pending());
        assert_eq!(
            dir.observe(scan(&route), start + POLL * 3),
            None,
            "no change"
        );
    }

    /// A file written in two halves with a pause between them: the first half
    /// is never used, however long the pause within the stability window.
    #[test]
    fn a_file_written_in_two_halves_with_a_pause_is_never_read_half_way() {
        let (mut dir, start) = watched_dir();
        let old = format!("{SERVER}---\n{ROUTE}");
        let (objects, polls) = poll_until_used(&mut dir, &[("all.yaml", read(&old))], start, 0);
        assert_eq!(route_names(&objects), ["deepseek-simple"]);

        let new = format!(
            "{SERVER}---\n{}",
            ROUTE.replace("deepseek-simple", "renamed")
        );
        let (first_half, _) = new.split_at(new.len() / 2);
        // The first half is on disk for two polls (a 250..400 ms pause).
        for poll in 1..=2 {
            let at = start + POLL * (polls + poll);
            assert_eq!(
                dir.observe(scan(&[("all.yaml", read(first_half))]), at),
                None
            );
        }
        let (objects, _) = poll_until_used(&mut dir, &[("all.yaml", read(&new))], start, polls + 3);
        assert_eq!(route_names(&objects), ["renamed"]);
        assert_eq!(objects.servers.len(), 1);
        assert!(objects.problems.is_empty(), "{:?}", objects.problems);
    }

    #[test]
    fn files_changed_in_one_burst_are_used_together() {
        let (mut dir, start) = watched_dir();
        let route = ("routes.yaml", read(ROUTE));
        let server = ("servers.yaml", read(SERVER));
        assert_eq!(dir.observe(scan(std::slice::from_ref(&route)), start), None);
        // The server file appears one poll later: the route waits for it.
        let both = [route, server];
        assert_eq!(dir.observe(scan(&both), start + POLL), None);
        assert_eq!(dir.observe(scan(&both), start + POLL * 2), None);
        let objects = dir
            .observe(scan(&both), start + POLL * 3)
            .expect("both stable");
        assert_eq!((objects.routes.len(), objects.servers.len()), (1, 1));
    }

    #[test]
    fn a_file_that_never_stops_changing_does_not_hold_back_the_others() {
        let (mut dir, start) = watched_dir();
        let mut objects = None;
        for poll in 0..10 {
            let churning = read(&format!("# edit {poll}\n{POD}"));
            let files = [("routes.yaml", read(ROUTE)), ("pods.yaml", churning)];
            if let Some(used) = dir.observe(scan(&files), start + POLL * poll) {
                objects = Some((used, poll));
                break;
            }
        }
        let (objects, poll) = objects.expect("the stable file is used after the max delay");
        assert_eq!(poll, 5, "max delay 1 s = 5 polls");
        assert_eq!(route_names(&objects), ["deepseek-simple"]);
        assert!(objects.pods.is_empty(), "the churning file is not read yet");
        assert!(dir.has_pending());
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects_until_fixed() {
        let (mut dir, start) = watched_dir();
        let good = format!("{SERVER}---\n{ROUTE}");
        let (_, polls) = poll_until_used(&mut dir, &[("all.yaml", read(&good))], start, 0);

        let broken = format!(
            "{SERVER}---\n{}\nkind: [unclosed",
            ROUTE.replace("deepseek-simple", "new")
        );
        let (objects, polls) =
            poll_until_used(&mut dir, &[("all.yaml", read(&broken))], start, polls + 1);
        assert_eq!(
            route_names(&objects),
            ["deepseek-simple"],
            "the last good route stays"
        );
        assert_eq!(objects.servers.len(), 1);
        let errors: Vec<&str> = objects.problems.iter().map(|p| p.error.as_str()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].ends_with("the rest of the file was not read"),
            "{errors:?}"
        );
        assert_eq!(
            errors[1],
            "keeping the 2 objects of this file's last version that loaded without problems until it is fixed"
        );

        let unreadable = FileRead::Unreadable("dangling symbolic link to ..data/all.yaml".into());
        let (objects, polls) =
            poll_until_used(&mut dir, &[("all.yaml", unreadable)], start, polls + 1);
        assert_eq!(
            route_names(&objects),
            ["deepseek-simple"],
            "still the last good route"
        );
        assert_eq!(
            objects.problems[0].error,
            "dangling symbolic link to ..data/all.yaml"
        );

        let fixed = format!("{SERVER}---\n{}", ROUTE.replace("deepseek-simple", "new"));
        let (objects, _) =
            poll_until_used(&mut dir, &[("all.yaml", read(&fixed))], start, polls + 1);
        assert_eq!(route_names(&objects), ["new"]);
        assert!(objects.problems.is_empty());
    }

    #[test]
    fn a_file_that_never_loaded_cleanly_contributes_what_did_load() {
        let mut dir = DirFiles::new(settings());
        let partial = format!("{ROUTE}---\nkind: [unclosed");
        let (objects, _) =
            poll_until_used(&mut dir, &[("a.yaml", read(&partial))], clock::now(), 0);
        assert_eq!(route_names(&objects), ["deepseek-simple"]);
        assert_eq!(objects.problems.len(), 1);
    }

    #[test]
    fn a_deleted_file_takes_its_objects_once_the_deletion_is_stable() {
        let (mut dir, start) = watched_dir();
        let files = [("routes.yaml", read(ROUTE)), ("pods.yaml", read(POD))];
        let (_, polls) = poll_until_used(&mut dir, &files, start, 0);
        // Gone for one poll only (rm, then write again): nothing changes.
        let pods_only = [("pods.yaml", read(POD))];
        assert_eq!(
            dir.observe(scan(&pods_only), start + POLL * (polls + 1)),
            None
        );
        assert_eq!(dir.observe(scan(&files), start + POLL * (polls + 2)), None);
        assert!(!dir.has_pending());
        let (objects, _) = poll_until_used(&mut dir, &pods_only, start, polls + 3);
        assert!(objects.routes.is_empty());
        assert_eq!(objects.pods.len(), 1);
    }

    #[test]
    fn a_pod_defined_in_two_files_counts_once_and_is_reported() {
        let mut dir = DirFiles::new(settings());
        let moved = POD.replace("127.0.0.1", "127.0.0.2");
        let files = [("a-pods.yaml", read(POD)), ("b-pods.yaml", read(&moved))];
        let (objects, _) = poll_until_used(&mut dir, &files, clock::now(), 0);
        assert_eq!(objects.pods.len(), 1);
        let kept_ip = objects.pods[0]
            .status
            .as_ref()
            .and_then(|status| status.pod_ip.as_deref());
        assert_eq!(
            kept_ip,
            Some("127.0.0.1"),
            "the first file in name order wins"
        );
        assert_eq!(objects.problems.len(), 1);
        let problem = &objects.problems[0];
        assert_eq!(problem.file, "b-pods.yaml");
        assert_eq!(problem.kind.as_deref(), Some("Pod"));
        assert_eq!(
            problem.error,
            "duplicate Pod default/ds-0: a-pods.yaml already defines it (files are read in name order); this one is ignored"
        );
    }
}
