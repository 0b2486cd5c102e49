//! Software RDMA fabric (being written).
