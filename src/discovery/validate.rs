//! The enum fields of the objects carousel reads, checked as the API server checks them:
//! a value outside the set is refused in the API server's words, so that a typo such as
//! `sessionAffinity: ClientIp` stops the state file instead of turning affinity off.
//!
//! Only the state file is checked here. Objects from the API server passed the same
//! checks there, and a value a later Kubernetes adds (a new `trafficDistribution`, say)
//! must not make carousel drop a Service the cluster accepted: `convert` reads an
//! unknown value as its default, except `addressType`, which it refuses from either
//! source because it decides how every address of the slice is read.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;

use crate::discovery::convert::{excerpt, FieldError};

// Each set sorted, as the API server lists the supported values.
const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const SESSION_AFFINITIES: &[&str] = &["ClientIP", "None"];
const TRAFFIC_POLICIES: &[&str] = &["Cluster", "Local"];
const IP_FAMILY_POLICIES: &[&str] = &["PreferDualStack", "RequireDualStack", "SingleStack"];
const IP_FAMILIES: &[&str] = &["IPv4", "IPv6"];
const TRAFFIC_DISTRIBUTIONS: &[&str] = &["PreferClose", "PreferSameNode", "PreferSameZone"];
const IP_MODES: &[&str] = &["Proxy", "VIP"];
const ADDRESS_TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];

/// `value` is one of `supported`, or the API server's refusal:
/// `Unsupported value: "ClientIp": supported values: "ClientIP", "None"`.
fn one_of(field: impl Into<String>, value: &str, supported: &[&str]) -> Result<(), FieldError> {
    if supported.contains(&value) {
        return Ok(());
    }
    let listed: Vec<String> = supported.iter().map(|v| format!("{v:?}")).collect();
    Err(FieldError::new(
        field,
        format!(
            "Unsupported value: {}: supported values: {}",
            excerpt(value),
            listed.join(", ")
        ),
    ))
}

/// A field the API server defaults when it is empty (a plain string in Go): empty is
/// unset, and the rest must be supported.
fn defaulted(field: &str, value: Option<&str>, supported: &[&str]) -> Result<(), FieldError> {
    match value {
        None | Some("") => Ok(()),
        Some(v) => one_of(field, v, supported),
    }
}

/// A field that is a pointer in Go: unset is fine, but once set, even to the empty
/// string, it must be supported.
fn optional(field: &str, value: Option<&str>, supported: &[&str]) -> Result<(), FieldError> {
    value.map_or(Ok(()), |v| one_of(field, v, supported))
}

/// Refuses a Service whose enum fields hold a value the API server refuses.
pub(crate) fn service(svc: &core::Service) -> Result<(), FieldError> {
    // A missing spec is `convert`'s to refuse.
    if let Some(spec) = &svc.spec {
        service_spec(spec)?;
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let field = format!("status.loadBalancer.ingress[{i}].ipMode");
        optional(&field, ing.ip_mode.as_deref(), IP_MODES)?;
    }
    Ok(())
}

fn service_spec(spec: &core::ServiceSpec) -> Result<(), FieldError> {
    defaulted("spec.type", spec.type_.as_deref(), SERVICE_TYPES)?;
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}].protocol");
        defaulted(&field, port.protocol.as_deref(), PROTOCOLS)?;
    }
    defaulted(
        "spec.sessionAffinity",
        spec.session_affinity.as_deref(),
        SESSION_AFFINITIES,
    )?;
    defaulted(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
        TRAFFIC_POLICIES,
    )?;
    optional(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
        TRAFFIC_POLICIES,
    )?;
    optional(
        "spec.ipFamilyPolicy",
        spec.ip_family_policy.as_deref(),
        IP_FAMILY_POLICIES,
    )?;
    for (i, family) in spec.ip_families.iter().flatten().enumerate() {
        one_of(format!("spec.ipFamilies[{i}]"), family, IP_FAMILIES)?;
    }
    optional(
        "spec.trafficDistribution",
        spec.traffic_distribution.as_deref(),
        TRAFFIC_DISTRIBUTIONS,
    )
}

/// Refuses an EndpointSlice whose enum fields hold a value the API server refuses.
pub(crate) fn slice(slice: &discovery::EndpointSlice) -> Result<(), FieldError> {
    address_type(&slice.address_type)?;
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}].protocol");
        optional(&field, port.protocol.as_deref(), PROTOCOLS)?;
    }
    Ok(())
}

/// `addressType`, which is required: `convert` refuses a bad one from either source.
pub(crate) fn address_type(value: &str) -> Result<(), FieldError> {
    match value {
        "" => Err(FieldError::new("addressType", "Required value")),
        v => one_of("addressType", v, ADDRESS_TYPES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_from(yaml: &str) -> core::Service {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    /// The refusal of a Service whose `spec` holds `spec` beside a ClusterIP and a port.
    fn spec_error(spec: &str) -> Option<String> {
        let svc = service_from(&format!(
            "metadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}], {spec}}}\n"
        ));
        service(&svc).err().map(|e| e.to_string())
    }

    #[test]
    fn session_affinity_is_refused_in_the_api_servers_words() {
        assert_eq!(
            spec_error("sessionAffinity: ClientIp").as_deref(),
            Some(
                r#"spec.sessionAffinity: Unsupported value: "ClientIp": supported values: "ClientIP", "None""#
            )
        );
    }

    /// Every enum field: each supported value passes, a near miss is refused naming the
    /// field, the value and the supported values.
    #[test]
    fn each_enum_field_of_a_service_takes_its_values_only() {
        let cases: [(&str, &str, &[&str], &str); 8] = [
            ("type", "spec.type", SERVICE_TYPES, "Nodeport"),
            (
                "sessionAffinity",
                "spec.sessionAffinity",
                SESSION_AFFINITIES,
                "none",
            ),
            (
                "externalTrafficPolicy",
                "spec.externalTrafficPolicy",
                TRAFFIC_POLICIES,
                "Global",
            ),
            (
                "internalTrafficPolicy",
                "spec.internalTrafficPolicy",
                TRAFFIC_POLICIES,
                "local",
            ),
            (
                "ipFamilyPolicy",
                "spec.ipFamilyPolicy",
                IP_FAMILY_POLICIES,
                "DualStack",
            ),
            (
                "trafficDistribution",
                "spec.trafficDistribution",
                TRAFFIC_DISTRIBUTIONS,
                "PreferClosest",
            ),
            ("ipFamilies", "spec.ipFamilies[1]", IP_FAMILIES, "IPv5"),
            ("ports", "spec.ports[1].protocol", PROTOCOLS, "tcp"),
        ];
        for (key, field, supported, bad) in cases {
            let spec = |value: &str| match key {
                "ipFamilies" => format!("ipFamilies: [IPv4, {value}]"),
                "ports" => format!("ports: [{{port: 80}}, {{port: 81, protocol: {value}}}]"),
                _ => format!("{key}: {value}"),
            };
            for good in supported {
                assert_eq!(spec_error(&spec(good)), None, "{key}: {good}");
            }
            let listed: Vec<String> = supported.iter().map(|v| format!("\"{v}\"")).collect();
            assert_eq!(
                spec_error(&spec(bad)),
                Some(format!(
                    "{field}: Unsupported value: \"{bad}\": supported values: {}",
                    listed.join(", ")
                )),
                "{key}"
            );
        }
    }

    #[test]
    fn empty_is_unset_where_the_api_server_defaults_it_and_refused_where_it_is_a_pointer() {
        for key in ["type", "sessionAffinity", "externalTrafficPolicy"] {
            assert_eq!(spec_error(&format!("{key}: ''")), None, "{key}");
        }
        assert_eq!(
            spec_error("ports: [{port: 80, protocol: ''}]"),
            None,
            "a Service port's protocol defaults to TCP"
        );
        for key in [
            "internalTrafficPolicy",
            "ipFamilyPolicy",
            "trafficDistribution",
        ] {
            let error = spec_error(&format!("{key}: ''")).expect("refused");
            assert!(
                error.starts_with(&format!("spec.{key}: Unsupported value: \"\": ")),
                "{error}"
            );
        }
        // Unset altogether is fine everywhere.
        assert_eq!(spec_error("selector: {app: web}"), None);
    }

    #[test]
    fn the_load_balancer_ip_mode_takes_vip_or_proxy() {
        let with_mode = |mode: &str| {
            service_from(&format!(
                "metadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10}}\n\
                 status: {{loadBalancer: {{ingress: [{{ip: 1.2.3.4}}, {{ip: 1.2.3.5, ipMode: {mode}}}]}}}}\n"
            ))
        };
        assert!(service(&with_mode("VIP")).is_ok());
        assert!(service(&with_mode("Proxy")).is_ok());
        let error = service(&with_mode("proxy")).unwrap_err();
        assert_eq!(error.field, "status.loadBalancer.ingress[1].ipMode");
        assert_eq!(
            error.message,
            r#"Unsupported value: "proxy": supported values: "Proxy", "VIP""#
        );
    }

    fn slice_from(address_type: &str, ports: &str) -> discovery::EndpointSlice {
        serde_yaml::from_str(&format!(
            "metadata: {{name: web-1}}\naddressType: '{address_type}'\nports: {ports}\nendpoints: []\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_slices_address_type_and_port_protocols_take_their_values_only() {
        for good in ADDRESS_TYPES {
            assert!(slice(&slice_from(good, "[]")).is_ok(), "{good}");
        }
        let error = slice(&slice_from("ipv4", "[]")).unwrap_err().to_string();
        assert_eq!(
            error,
            r#"addressType: Unsupported value: "ipv4": supported values: "FQDN", "IPv4", "IPv6""#
        );
        let error = slice(&slice_from("", "[]")).unwrap_err().to_string();
        assert_eq!(error, "addressType: Required value");

        let ports = "[{port: 80}, {port: 53, protocol: UDP}, {port: 36412, protocol: SCTP}]";
        assert!(slice(&slice_from("IPv4", ports)).is_ok());
        for bad in ["Tcp", ""] {
            let ports = format!("[{{port: 80, protocol: TCP}}, {{port: 81, protocol: '{bad}'}}]");
            let error = slice(&slice_from("IPv4", &ports)).unwrap_err();
            assert_eq!(error.field, "ports[1].protocol");
            assert_eq!(
                error.message,
                format!(r#"Unsupported value: "{bad}": supported values: "SCTP", "TCP", "UDP""#)
            );
        }
    }

    #[test]
    fn a_quoted_value_is_bounded_and_escaped() {
        let long = format!("Client\n{}", "x".repeat(10_000));
        let error = one_of("spec.sessionAffinity", &long, SESSION_AFFINITIES).unwrap_err();
        assert!(error.message.len() < 300, "{}", error.message);
        assert!(!error.message.contains('\n'), "{}", error.message);
        assert!(error.message.contains("(10007 bytes)"), "{}", error.message);
    }
}
