//! Kubernetes, as pure transformations: the CRDs, injection of a pod template (one function for `ferryctl inject`
//! and the admission webhook), and discovery's mapping of Services, EndpointSlices and Pods to the model.

pub mod crd;
pub mod discovery;
pub mod gateway;
pub mod inject;

/// The Secret holding the mesh root, in the control plane's namespace.
pub const CA_SECRET: &str = "ferry-ca";
/// The injector's MutatingWebhookConfiguration, whose `caBundle` the control plane keeps at the mesh root.
pub const WEBHOOK_CONFIGURATION: &str = "ferry-injector";
