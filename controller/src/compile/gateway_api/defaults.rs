//! The GatewayClass and the default Gateway Gateway API mode starts with, as
//! the Kthena router creates them: a class implemented by Switchyard, and a
//! Gateway with one HTTP listener `default` that stands for the dataplanes'
//! traffic port, so routes written for Kthena (`parentRefs` to
//! `<namespace>/default`) keep working. Kubernetes mode creates them when
//! absent; local mode adds them to the directory's objects when absent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use switchyard_crd::gateway_api::{AllowedRoutes, Listener, RouteNamespaces};
use switchyard_crd::{Gateway, GatewayClass, GatewayClassSpec, GatewaySpec};

/// Name of the default Gateway's one listener (Kthena's).
pub const DEFAULT_LISTENER_NAME: &str = "default";

/// A GatewayClass `name` implemented by `controller_name`.
pub fn default_gateway_class(name: &str, controller_name: &str) -> GatewayClass {
    GatewayClass {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: GatewayClassSpec {
            controller_name: controller_name.to_owned(),
            description: Some("Switchyard: Gateways served by every dataplane".to_owned()),
            parameters_ref: None,
        },
        status: None,
    }
}

/// The default Gateway `namespace/name` of class `class_name`: one HTTP
/// listener on `port` taking routes from every namespace (it stands for the
/// traffic port every route without parentRefs serves on).
pub fn default_gateway(namespace: &str, name: &str, class_name: &str, port: u16) -> Gateway {
    Gateway {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        spec: GatewaySpec {
            gateway_class_name: class_name.to_owned(),
            listeners: vec![Listener {
                name: DEFAULT_LISTENER_NAME.to_owned(),
                hostname: None,
                port: i32::from(port),
                protocol: "HTTP".to_owned(),
                tls: None,
                allowed_routes: Some(AllowedRoutes {
                    namespaces: Some(RouteNamespaces {
                        from: Some("All".to_owned()),
                        selector: None,
                    }),
                    kinds: Vec::new(),
                }),
            }],
            addresses: Vec::new(),
        },
        status: None,
    }
}

/// The GatewayClass and default Gateway of one controller's flags.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayDefaults {
    pub class: GatewayClass,
    pub gateway: Gateway,
}

impl GatewayDefaults {
    /// Class `class_name` implemented by `controller_name`, and the default
    /// Gateway `namespace/name` of that class with its listener on `port`.
    pub fn new(
        class_name: &str,
        controller_name: &str,
        (namespace, name): (&str, &str),
        port: u16,
    ) -> Self {
        Self {
            class: default_gateway_class(class_name, controller_name),
            gateway: default_gateway(namespace, name, class_name, port),
        }
    }

    /// Adds the class and the Gateway to `objects` unless objects of their
    /// names are there already (local mode: the directory's own win).
    pub fn add_missing(&self, objects: &mut crate::compile::ObjectSet) {
        let class_name = self.class.metadata.name.as_deref();
        if !objects
            .gateway_classes
            .iter()
            .any(|class| class.metadata.name.as_deref() == class_name)
        {
            objects.gateway_classes.push(self.class.clone());
        }
        let key = |metadata: &ObjectMeta| {
            (
                crate::compile::namespace_of(metadata).to_owned(),
                metadata.name.clone(),
            )
        };
        let gateway = key(&self.gateway.metadata);
        if !objects
            .gateways
            .iter()
            .any(|existing| key(&existing.metadata) == gateway)
        {
            objects.gateways.push(self.gateway.clone());
        }
    }
}
