//! The model's own scheduler: `_class_name` in `scheduler_config.json` picks
//! the default, so a model runs as its authors configured it unless the caller
//! names another. A class we do not port falls back to Euler (said once at
//! load, and reported as pipeline info `scheduler.default`); a name that is
//! no diffusers scheduler at all is a broken config and is refused.

use super::{build_scheduler, name_for_class, SchedulerConfig, SCHEDULER_NAMES};
use crate::error::{Error, Result};

/// Every scheduler class diffusers (v0.3x-0.4x) ships, ported or not.
pub const DIFFUSERS_CLASSES: &[&str] = &[
    "AmusedScheduler",
    "CMStochasticIterativeScheduler",
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "CosineDPMSolverMultistepScheduler",
    "DDIMInverseScheduler",
    "DDIMParallelScheduler",
    "DDIMScheduler",
    "DDPMParallelScheduler",
    "DDPMScheduler",
    "DDPMWuerstchenScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepInverseScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
    "HeunDiscreteScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "RePaintScheduler",
    "SASolverScheduler",
    "SCMScheduler",
    "ScoreSdeVeScheduler",
    "ScoreSdeVpScheduler",
    "TCDScheduler",
    "UnCLIPScheduler",
    "UniPCMultistepScheduler",
    "VQDiffusionScheduler",
];

/// The scheduler a job uses when it names none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDefault {
    /// One of [`SCHEDULER_NAMES`].
    pub name: &'static str,
    /// Why the config's class is not used, when it is not.
    pub fallback: Option<String>,
}

/// Picks the default scheduler for `config`. Errors only for a `_class_name`
/// that is not a diffusers scheduler (a typo or a foreign config).
pub fn model_default(config: &SchedulerConfig) -> Result<ModelDefault> {
    let euler = SCHEDULER_NAMES[0];
    let fallback = |why: String| ModelDefault {
        name: euler,
        fallback: Some(format!("{why}; the default scheduler is {euler}")),
    };
    let Some(class) = config.class_name.as_deref() else {
        return Ok(fallback("the config names no _class_name".into()));
    };
    if let Some(name) = name_for_class(class, config) {
        // A ported class whose settings we do not support (e.g. a DPM-Solver
        // `algorithm_type`) still leaves the model usable with Euler.
        return Ok(match build_scheduler(name, config, 0.0) {
            Ok(_) => ModelDefault {
                name,
                fallback: None,
            },
            Err(e) => fallback(format!("{class} as configured is not supported ({e})")),
        });
    }
    if DIFFUSERS_CLASSES.contains(&class) {
        return Ok(fallback(format!("{class} is not implemented here")));
    }
    Err(Error::invalid_model(format!(
        "scheduler config: _class_name '{class}' is not a diffusers scheduler class \
         (ported: EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler, \
         DPMSolverMultistepScheduler, DDPMScheduler)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(class: Option<&str>) -> SchedulerConfig {
        SchedulerConfig {
            class_name: class.map(str::to_owned),
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn ported_classes_are_the_default() {
        for (class, name) in [
            ("EulerDiscreteScheduler", "euler"),
            ("EulerAncestralDiscreteScheduler", "euler_a"),
            ("DDIMScheduler", "ddim"),
            ("DPMSolverMultistepScheduler", "dpmpp_2m"),
            ("DDPMScheduler", "ddpm"),
        ] {
            let d = model_default(&config(Some(class))).unwrap();
            assert_eq!(
                d,
                ModelDefault {
                    name,
                    fallback: None
                },
                "{class}"
            );
            assert!(DIFFUSERS_CLASSES.contains(&class));
        }
        let mut karras = config(Some("DPMSolverMultistepScheduler"));
        karras.use_karras_sigmas = true;
        assert_eq!(model_default(&karras).unwrap().name, "dpmpp_2m_karras");
    }

    #[test]
    fn unported_class_falls_back_to_euler_and_says_why() {
        let d = model_default(&config(Some("PNDMScheduler"))).unwrap();
        assert_eq!(d.name, "euler");
        let why = d.fallback.unwrap();
        assert!(
            why.contains("PNDMScheduler") && why.contains("euler"),
            "{why}"
        );
        let none = model_default(&config(None)).unwrap();
        assert!(none.fallback.unwrap().contains("_class_name"));
        let mut sde = config(Some("DPMSolverMultistepScheduler"));
        sde.algorithm_type = "sde-dpmsolver++".into();
        let d = model_default(&sde).unwrap();
        assert_eq!(d.name, "euler");
        assert!(d.fallback.unwrap().contains("algorithm_type"));
    }

    #[test]
    fn unknown_class_is_refused_by_name() {
        let e = model_default(&config(Some("WarpDriveScheduler"))).unwrap_err();
        assert!(e.message.contains("'WarpDriveScheduler'"), "{}", e.message);
    }
}
