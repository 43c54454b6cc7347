//! `lora-affinity`: only pods that report the requested model (base model or
//! LoRA adapter) in their `/v1/models`, as scraped by the controller.

use switchyard_snapshot::scheduler;

use super::{Candidate, FilterError, FilterPlugin, Implementation, PluginInput};

pub const IMPLEMENTATION: Implementation =
    Implementation::filter(&scheduler::lora_affinity::SPEC, |_| {
        Ok(Box::new(LoraAffinity))
    });

#[derive(Debug)]
struct LoraAffinity;

impl FilterPlugin for LoraAffinity {
    fn filter(
        &self,
        candidates: &mut Vec<Candidate>,
        request: &PluginInput<'_>,
    ) -> Result<(), FilterError> {
        filter(candidates, request.served_model)
    }

    fn reads_model_lists(&self) -> bool {
        true
    }
}

/// Pods known to have `model` stay. Pods whose model list is unknown (never
/// scraped) stay only when no pod is known to have it, so a fresh start
/// still serves; pods known to lack it never get the request.
pub fn filter(candidates: &mut Vec<Candidate>, model: &str) -> Result<(), FilterError> {
    let has = |c: &Candidate| {
        c.any_load
            .as_ref()
            .map(|load| load.models.iter().any(|m| m == model))
    };
    if candidates.iter().any(|c| has(c) == Some(true)) {
        candidates.retain(|c| has(c) == Some(true));
    } else {
        candidates.retain(|c| {
            c.any_load
                .as_ref()
                .is_none_or(|load| load.models.is_empty())
        });
    }
    if candidates.is_empty() {
        return Err(FilterError::ModelNotLoaded(model.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::candidate;
    use super::*;
    use switchyard_snapshot::pb;

    fn serving(models: &[&str]) -> Option<pb::EndpointLoad> {
        Some(pb::EndpointLoad {
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            observed_at_unix_ms: 1,
            ..Default::default()
        })
    }

    #[test]
    fn keeps_only_pods_with_the_adapter() {
        let mut pods = vec![
            candidate(0, 0, serving(&["base", "lora-a"])),
            candidate(1, 0, serving(&["base"])),
            candidate(2, 0, None),
        ];
        filter(&mut pods, "lora-a").expect("one pod has it");
        assert_eq!(pods.iter().map(|c| c.index).collect::<Vec<_>>(), [0]);

        let mut pods = vec![candidate(0, 0, serving(&["base"])), candidate(1, 0, None)];
        filter(&mut pods, "lora-b").expect("unknown pod may have it");
        assert_eq!(pods.iter().map(|c| c.index).collect::<Vec<_>>(), [1]);

        let mut pods = vec![candidate(0, 0, serving(&["base"]))];
        assert_eq!(
            filter(&mut pods, "lora-b"),
            Err(FilterError::ModelNotLoaded("lora-b".into()))
        );
    }
}
