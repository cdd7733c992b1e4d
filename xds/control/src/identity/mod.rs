//! The mesh's identities: the CA (`ca`), the CSR service and the one place that authenticates a proxy (`certify`),
//! the join tokens a first certificate is requested with (`tokens`), the xDS port's TLS and serving certificate
//! (`serving`), root rotation end to end (`rotation`), and the limits in front of TokenReviews (`reviews`).

pub mod ca;
pub mod certify;
pub mod reviews;
pub mod rotation;
pub mod serving;
pub mod tokens;
