//! `[service.NAME]` in `imago.toml`: the types and checks live in imago-spec (which the fuzz
//! target links without the runtime); here they become the runtime's types.

pub use imago_spec::{
    Amount, HealthCheck, Limits, NetworkMode, Probe, ProbeKind, Resources, RolloutSettings,
    SeccompFilter, SeccompSetting, ServiceSpec, SpecError, Strategy, VolumeMount, VolumeSource,
    service_json_schema, validate_all,
};
pub use imago_spec::{EngineKind, ResolvedTarget, TargetRef, TargetSpec, target_json_schema};

/// The runtime's network mode for a service's.
pub fn runtime_network(mode: NetworkMode) -> imago_runtime::NetworkMode {
    match mode {
        NetworkMode::Private => imago_runtime::NetworkMode::Private,
        NetworkMode::Host => imago_runtime::NetworkMode::Host,
    }
}

/// The filter an instance of the service runs under; a path not read yet, or a profile the
/// runtime does not accept, is an error.
pub fn runtime_seccomp(setting: Option<&SeccompSetting>) -> Result<imago_runtime::Seccomp, String> {
    match setting {
        None | Some(SeccompSetting::Resolved(SeccompFilter::Default)) => {
            Ok(imago_runtime::Seccomp::Default)
        }
        Some(SeccompSetting::Resolved(SeccompFilter::Unconfined)) => {
            Ok(imago_runtime::Seccomp::Unconfined)
        }
        Some(SeccompSetting::Resolved(SeccompFilter::Profile(profile))) => {
            imago_runtime::Seccomp::from_profile(profile.clone())
        }
        Some(SeccompSetting::File(path)) => Err(format!("profile file {path} was not read")),
    }
}

/// A service's setting for a filter the runtime has read or checked: the form a release keeps.
pub fn seccomp_setting(seccomp: &imago_runtime::Seccomp) -> Result<SeccompSetting, String> {
    Ok(SeccompSetting::Resolved(match seccomp {
        imago_runtime::Seccomp::Default => SeccompFilter::Default,
        imago_runtime::Seccomp::Unconfined => SeccompFilter::Unconfined,
        imago_runtime::Seccomp::Profile(profile) => {
            SeccompFilter::Profile(serde_json::to_value(profile).map_err(|e| e.to_string())?)
        }
    }))
}
