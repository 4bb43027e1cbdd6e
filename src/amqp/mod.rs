//! Everything that talks to RabbitMQ: the topology both sides agree on, the
//! consumer that feeds the router, and the ordered acknowledgements.

pub mod consumer;
pub mod settle;
pub mod topology;
