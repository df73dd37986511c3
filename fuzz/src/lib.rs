//! The fuzz targets' shared checks (see [`oracle`]).
pub mod oracle;
