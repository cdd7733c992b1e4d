//! The mesh's identities: the CA (`ca`), the CSR service and the one place that authenticates a proxy (`certify`),
//! the join tokens a first certificate is requested with (`tokens`), the xDS port's TLS and serving certificate
//! (`serving`), and root rotation end to end (`rotation`).

pub mod ca;
pub mod certify;
pub mod rotation;
pub mod serving;
pub mod tokens;
