-- What each relay is doing (in flight, published in the last minute, per topic), as JSON,
-- for operators' status. Additive: older relays simply leave it '{}'.
ALTER TABLE event_outbox_relay ADD COLUMN activity TEXT NOT NULL DEFAULT '{}';
