//! Every harness on a smaller run (`make test`); `make fuzz` runs a million
//! inputs each. One test, because a run silences the process-wide panic hook.

use switchyard_fuzz::{harnesses, run};

/// Inputs per harness in `make test`: seconds in a debug build.
const INPUTS: u64 = 5_000;

#[test]
fn every_harness_holds_on_generated_inputs() {
    for harness in harnesses::all() {
        let report = run(&harness, 7, INPUTS, |_| {});
        assert_eq!(report.inputs, INPUTS);
        assert!(
            report.failures.is_empty(),
            "{}: {} failing inputs, first: {:?}",
            harness.name,
            report.failures.len(),
            report
                .failures
                .first()
                .map(|(iteration, message, _)| (iteration, message))
        );
    }
}
