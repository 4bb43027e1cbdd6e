//! Everything that talks to RabbitMQ: the topology both sides agree on, the
//! consumer that feeds the router, the ordered acknowledgements, and the
//! confirm-mode publisher behind the HTTP send endpoint.

pub mod consumer;
pub mod publisher;
pub mod settle;
pub mod topology;
