"""Every SMTP reply the relay itself composes, in one place, with RFC 3463 enhanced status codes."""

QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
SENDER_OK = "250 2.1.0 Sender ok"
RECIPIENT_OK = "250 2.1.5 Recipient ok"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients in this message; send the rest in another"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds the fixed limit of {limit} bytes"
RELAY_DENIED = "530 5.7.0 Authentication required: this relay only accepts mail from its own clients"
NOT_STORED = "451 4.3.0 Message not stored (queue unavailable); please try again later"
INTERNAL_ERROR = "451 4.3.0 Temporary local problem; please try again later"
OVERLOADED = "451 4.3.2 The relay is busy; please try again later"
TOO_MANY_SESSIONS = "421 4.3.2 Too many connections; please try again later"
SHUTTING_DOWN = "421 4.3.2 The relay is shutting down; please try again later"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
SENDER_NOT_ALLOWED = "553 5.7.1 Sender address not allowed for login {user}"
USER_SESSIONS = "451 4.7.0 Too many concurrent sessions for login {user}; try again later"
RATE_LIMITED = "451 4.7.1 Rate limit for {source} ({limit} messages per minute) reached; try again later"
LINE_TOO_LONG = "500 5.5.2 Line too long: the limit is 1000 octets per line (RFC 5321 4.5.3.1.6)"
DATA_TIMEOUT = "421 4.4.2 Data transfer took too long; closing the connection"
BAD_ADDRESS = "553 5.1.3 Bad recipient address: not UTF-8 or contains control characters"
BAD_SENDER = "553 5.1.7 Bad sender address: not UTF-8 or contains control characters"

# Enhanced codes for the replies aiosmtpd composes on its own (RFC 3463, by basic code).
ENHANCED_BY_CODE = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "250": "2.0.0", "251": "2.1.5", "252": "2.1.5",
    "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "550": "5.7.1", "551": "5.7.1", "552": "5.3.4",
    "553": "5.1.3", "554": "5.6.0", "555": "5.5.4",
}
