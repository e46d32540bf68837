//! Address newtypes, so that a client's address, the Service address it dialed and
//! the pod address carousel forwards to can never be passed in each other's place.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

macro_rules! socket_addr_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub SocketAddr);

        impl $name {
            pub fn ip(&self) -> IpAddr {
                self.0.ip()
            }
            pub fn port(&self) -> u16 {
                self.0.port()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<SocketAddr> for $name {
            fn from(addr: SocketAddr) -> Self {
                Self(addr)
            }
        }
    };
}

socket_addr_newtype!(
    /// Where a connection came from.
    ClientAddr
);
socket_addr_newtype!(
    /// An address a Service is reached at: ClusterIP, external IP or node address, with its port.
    ServiceAddr
);
socket_addr_newtype!(
    /// A pod's address and target port: where carousel connects to.
    PodAddr
);
