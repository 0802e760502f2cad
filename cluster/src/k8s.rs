//! The Kubernetes provisioner: scales the storage StatefulSet and the executor Deployment of
//! `cluster/k8s/` through the API server, for the monitor running in the cluster.
//!
//! - Adding storage nodes or executors patches the `scale` subresource up. New storage pods
//!   join the router by themselves; new executors join the scheduler.
//! - Removing an executor marks its pod (the executor's id is its pod's name, from the
//!   downward API) with the lowest `controller.kubernetes.io/pod-deletion-cost`, then scales
//!   the Deployment down by one, so that its ReplicaSet deletes that pod: the executor gets
//!   SIGTERM and drains within the pod's termination grace period.
//! - Removing a storage node scales the StatefulSet down by one. A StatefulSet always removes
//!   its highest ordinal, whichever node the policy named; that pod hands its keys off on
//!   SIGTERM. The log says which was asked for and which goes.
//!
//! The requests are built apart from sending them ([`Requests`]), so unit tests check every
//! one without an API server. The client is `kube` (with `k8s-openapi` for the types): the
//! maintained Kubernetes client for Rust, which reads in-cluster service-account credentials
//! or a kubeconfig the same way `kubectl` does. TLS is rustls with `ring`, which needs no C
//! toolchain beyond what the workspace already uses.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::core::Request;
use kube::Resource;

use crate::{Error, Provisioner, Role};

/// The pod annotation a ReplicaSet reads to choose which pod to delete when scaling down.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// What the provisioner scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// The namespace of Squall's objects.
    pub namespace: String,
    /// The storage nodes' StatefulSet.
    pub storage: String,
    /// The executors' Deployment.
    pub executors: String,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            namespace: "squall".into(),
            storage: "squall-kvs".into(),
            executors: "squall-executor".into(),
        }
    }
}

/// The API requests the provisioner sends, built without a client.
#[derive(Debug, Clone)]
pub struct Requests {
    config: KubeConfig,
}

impl Requests {
    /// Requests for the objects `config` names.
    pub fn new(config: KubeConfig) -> Self {
        Self { config }
    }

    fn scaled(&self, role: Role) -> Result<(Request, &str), Error> {
        let namespace = Some(self.config.namespace.as_str());
        match role {
            Role::Storage => Ok((
                Request::new(StatefulSet::url_path(&(), namespace)),
                &self.config.storage,
            )),
            Role::Executor => Ok((
                Request::new(Deployment::url_path(&(), namespace)),
                &self.config.executors,
            )),
            other => Err(Error::Kubernetes(format!(
                "the {} role is not scaled by the policy engine",
                other.as_str()
            ))),
        }
    }

    /// Reads the scale of `role`'s object.
    pub fn get_scale(&self, role: Role) -> Result<http::Request<Vec<u8>>, Error> {
        let (request, name) = self.scaled(role)?;
        request
            .get_subresource("scale", name)
            .map_err(|e| Error::Kubernetes(e.to_string()))
    }

    /// Sets the replicas of `role`'s object.
    pub fn set_scale(&self, role: Role, replicas: i32) -> Result<http::Request<Vec<u8>>, Error> {
        let (request, name) = self.scaled(role)?;
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        request
            .patch_subresource(
                "scale",
                name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .map_err(|e| Error::Kubernetes(e.to_string()))
    }

    /// Marks `pod` as the first to go when its ReplicaSet scales down.
    pub fn mark_for_removal(&self, pod: &str) -> Result<http::Request<Vec<u8>>, Error> {
        let request = Request::new(Pod::url_path(&(), Some(self.config.namespace.as_str())));
        let patch = serde_json::json!({
            "metadata": { "annotations": { DELETION_COST: "-1000" } }
        });
        request
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .map_err(|e| Error::Kubernetes(e.to_string()))
    }
}

/// Scales Squall's objects through the Kubernetes API.
pub struct KubeProvisioner {
    requests: Requests,
    client: kube::Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for KubeProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeProvisioner")
            .field("config", &self.requests.config)
            .finish_non_exhaustive()
    }
}

impl KubeProvisioner {
    /// Connects with the pod's service account (or the local kubeconfig).
    pub fn connect(config: KubeConfig) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::Kubernetes(format!("starting a runtime: {e}")))?;
        let client = runtime
            .block_on(kube::Client::try_default())
            .map_err(|e| Error::Kubernetes(format!("connecting to the API server: {e}")))?;
        Ok(Self {
            requests: Requests::new(config),
            client,
            runtime,
        })
    }

    fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<T, Error> {
        let what = format!("{} {}", request.method(), request.uri());
        self.runtime
            .block_on(self.client.request::<T>(request))
            .map_err(|e| Error::Kubernetes(format!("{what}: {e}")))
    }

    fn replicas(&self, role: Role) -> Result<i32, Error> {
        let scale: Scale = self.send(self.requests.get_scale(role)?)?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0))
    }

    fn rescale(&self, role: Role, delta: i32) -> Result<i32, Error> {
        let replicas = (self.replicas(role)? + delta).max(0);
        let _: Scale = self.send(self.requests.set_scale(role, replicas)?)?;
        Ok(replicas)
    }
}

impl Provisioner for KubeProvisioner {
    fn add(&mut self, role: Role, count: u32) -> Result<(), Error> {
        let replicas = self.rescale(role, i32::try_from(count).unwrap_or(i32::MAX))?;
        tracing::info!(role = role.as_str(), replicas, "scaled up");
        Ok(())
    }

    fn remove(&mut self, role: Role, id: &str) -> Result<(), Error> {
        match role {
            Role::Executor => {
                let _: Pod = self.send(self.requests.mark_for_removal(id)?)?;
            }
            Role::Storage => tracing::info!(
                asked = id,
                "a StatefulSet removes its highest ordinal, which hands its keys off"
            ),
            _ => {}
        }
        let replicas = self.rescale(role, -1)?;
        tracing::info!(role = role.as_str(), replicas, "scaled down");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(request: &http::Request<Vec<u8>>) -> serde_json::Value {
        serde_json::from_slice(request.body()).expect("a JSON body")
    }

    fn content_type(request: &http::Request<Vec<u8>>) -> &str {
        request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[test]
    fn scaling_patches_the_scale_subresource() {
        let requests = Requests::new(KubeConfig::default());
        let up = requests.set_scale(Role::Storage, 4).expect("request");
        assert_eq!(up.method(), http::Method::PATCH);
        assert_eq!(
            up.uri().path(),
            "/apis/apps/v1/namespaces/squall/statefulsets/squall-kvs/scale"
        );
        assert_eq!(content_type(&up), "application/merge-patch+json");
        assert_eq!(body(&up), serde_json::json!({"spec": {"replicas": 4}}));

        let executors = requests.set_scale(Role::Executor, 1).expect("request");
        assert_eq!(
            executors.uri().path(),
            "/apis/apps/v1/namespaces/squall/deployments/squall-executor/scale"
        );
        let read = requests.get_scale(Role::Executor).expect("request");
        assert_eq!(read.method(), http::Method::GET);
        assert_eq!(read.uri().path(), executors.uri().path());
    }

    #[test]
    fn removing_an_executor_marks_its_pod_first() {
        let requests = Requests::new(KubeConfig {
            namespace: "prod".into(),
            ..KubeConfig::default()
        });
        let mark = requests
            .mark_for_removal("squall-executor-7d9f-abcde")
            .expect("request");
        assert_eq!(mark.method(), http::Method::PATCH);
        assert_eq!(
            mark.uri().path(),
            "/api/v1/namespaces/prod/pods/squall-executor-7d9f-abcde"
        );
        assert_eq!(
            body(&mark),
            serde_json::json!({"metadata": {"annotations": {DELETION_COST: "-1000"}}})
        );
    }

    #[test]
    fn only_storage_and_executors_scale_and_bad_names_are_refused() {
        let requests = Requests::new(KubeConfig::default());
        assert!(requests.set_scale(Role::Gateway, 2).is_err());
        assert!(requests.mark_for_removal("").is_err());
    }
}
