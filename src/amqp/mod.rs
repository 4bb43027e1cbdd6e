//! Everything that talks to RabbitMQ: opening a connection with the
//! configured TLS, the topology both sides agree on, the
//! consumer that feeds the router, the ordered acknowledgements, and the
//! confirm-mode publisher behind the HTTP send endpoint, and the receipt
//! publishers (delivery receipts before the ack, `read` receipts after a
//! change).

mod ack_queue;
pub mod connect;
pub mod consumer;
pub mod publisher;
pub mod read_receipts;
pub mod receipt_publisher;
pub mod settle;
pub mod topology;
